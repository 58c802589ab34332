"""`jax.nn.dot_product_attention` with gLM's relative terms passed as an additive bias.

The relative scores (q_i.D[i-j] + k_j.D[i-j]) / sqrt(head_dim) are built like `xla_shifted`'s and
handed over as `bias` [batch, heads, genes, genes] (materialised: O(B x H x S^2) memory); padding
goes in as the boolean `mask`. dot_product_attention multiplies q.k by `scale` before adding the
bias, hence the pre-division. On NVIDIA GPUs with bfloat16/float16 inputs it asks for cuDNN's
fused kernel and falls back to XLA where cuDNN refuses the shapes; elsewhere it is XLA's.
No attention dropout (the function has none) and no probabilities.
"""
from __future__ import annotations

import math

import jax

from glm_jax import kernels

RETURNS_PROBS = False
SUPPORTS_DROPOUT = False


def attention(q, k, v, distance_table, key_mask, *, max_positions: int, clip_distances: bool, relative: str,
              dropout_rate: float = 0.0, dropout_rng=None, return_probs: bool = False):
    """See `glm_jax.kernels`. Returns (context [batch, genes, heads, head_dim] in q's dtype, None)."""
    kernels.check_length(q.shape[1], max_positions, clip_distances)
    if dropout_rng is not None and dropout_rate > 0:
        kernels.check_dropout("fused", dropout_rate)
    bias = None
    if relative != "none":
        bias = (kernels.relative_scores(q, k, distance_table, 0, 0, max_positions, relative)
                / math.sqrt(q.shape[-1])).astype(q.dtype)
    mask = key_mask.astype(bool)[:, None, None, :]
    call = dict(bias=bias, mask=mask, scale=1.0 / math.sqrt(q.shape[-1]))
    if kernels.dot_product_implementation(q.dtype) == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **call), None
        except (ValueError, NotImplementedError, RuntimeError):
            pass  # shapes cuDNN does not take (head_dim, bias layout): XLA computes the same function
    return jax.nn.dot_product_attention(q, k, v, implementation="xla", **call), None
