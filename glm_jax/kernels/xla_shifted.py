"""Relative attention without the [genes, genes, head_dim] gather (Transformer-XL / DeBERTa shift).

q.D^T and k.D^T are computed against the 2 * genes - 1 distance rows a contig spans
([batch, heads, genes, 2 * genes - 1] each) and shifted into [genes, genes] by reshapes
(`kernels.skew`). Scores, probabilities and dropout are then exactly the reference's, so it
returns probabilities and supports dropout (same masks as the reference for the same rng). Memory:
O(batch x heads x genes^2), about 3x the reference's [B, H, S, S] scores but no [S, S, d] tensor.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from glm_jax import kernels
from glm_jax.model.dropout import dropout

RETURNS_PROBS = True
SUPPORTS_DROPOUT = True


def scores(q, k, distance_table, *, max_positions: int, relative: str) -> jax.Array:
    """Unnormalised, unmasked scores / sqrt(head_dim), float32: [batch, heads, genes, genes]."""
    total = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if relative != "none":
        total += kernels.relative_scores(q, k, distance_table, 0, 0, max_positions, relative)
    return total / math.sqrt(q.shape[-1])


def attention(q, k, v, distance_table, key_mask, *, max_positions: int, clip_distances: bool, relative: str,
              dropout_rate: float = 0.0, dropout_rng=None, return_probs: bool = False):
    """See `glm_jax.kernels`. Returns (context [batch, genes, heads, head_dim] in v's dtype, probs)."""
    kernels.check_length(q.shape[1], max_positions, clip_distances)
    logits = scores(q, k, distance_table, max_positions=max_positions, relative=relative)
    probs = jax.nn.softmax(logits + kernels.key_bias(key_mask), axis=-1)
    context = jnp.einsum("bhqk,bkhd->bqhd", dropout(probs, dropout_rate, dropout_rng).astype(v.dtype), v)
    return context, probs if return_probs else None
