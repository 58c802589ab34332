"""The reference attention: HF RoBERTa's relative_key_query, term by term.

Gathers D[i - j] for every (query, key) pair into [genes, genes, head_dim] and materialises the
[batch, heads, genes, genes] scores and probabilities: the original's numerics (and memory). Attention
dropout drops the normalised probabilities, as HF does. The other implementations are tested
against this one.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from glm_jax import kernels
from glm_jax.model.dropout import dropout

RETURNS_PROBS = True
SUPPORTS_DROPOUT = True


def relative_distance_embeddings(distance_table: jax.Array, num_genes: int, max_positions: int) -> jax.Array:
    """Gathers D[i - j] (clamped to the table) for every query i and key j.

    distance_table: [2 * max_positions - 1, head_dim] -> [genes(i), genes(j), head_dim]
    """
    positions = jnp.arange(num_genes)
    return distance_table[kernels.distance_rows(positions[:, None] - positions[None, :], max_positions)]


def attention_probabilities(q, k, distance_table, key_mask, *, max_positions: int, relative: str) -> jax.Array:
    """Softmax attention weights with relative position scores, in float32.

    q, k: [batch, genes, heads, head_dim]; distance_table: [2 * max_positions - 1, head_dim];
    key_mask: [batch, genes] -> [batch, heads, genes(query), genes(key)]
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if relative != "none":
        rel = relative_distance_embeddings(distance_table, q.shape[1], max_positions).astype(q.dtype)
        scores += jnp.einsum("bqhd,qkd->bhqk", q, rel, preferred_element_type=jnp.float32)
        if relative == "relative_key_query":
            scores += jnp.einsum("bkhd,qkd->bhqk", k, rel, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1]) + kernels.key_bias(key_mask)
    return jax.nn.softmax(scores, axis=-1)


def attention(q, k, v, distance_table, key_mask, *, max_positions: int, clip_distances: bool, relative: str,
              dropout_rate: float = 0.0, dropout_rng=None, return_probs: bool = False):
    """See `glm_jax.kernels`. Returns (context [batch, genes, heads, head_dim] in v's dtype, probs)."""
    kernels.check_length(q.shape[1], max_positions, clip_distances)
    probs = attention_probabilities(q, k, distance_table, key_mask, max_positions=max_positions, relative=relative)
    context = jnp.einsum("bhqk,bkhd->bqhd", dropout(probs, dropout_rate, dropout_rng).astype(v.dtype), v)
    return context, probs if return_probs else None
