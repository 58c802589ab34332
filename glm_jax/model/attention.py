"""The one dispatch from the encoder to an attention implementation of `glm_jax.kernels`."""
from __future__ import annotations

from typing import Optional

import jax

from glm_jax import kernels


def attention(q, k, v, distance_table, key_mask, *, implementation: str, max_positions: int,
              clip_distances: bool, relative: str, dropout_rate: float = 0.0,
              dropout_rng: Optional[jax.Array] = None,
              return_probs: bool = False) -> tuple[jax.Array, Optional[jax.Array]]:
    """Relative-position attention by the implementation named `implementation`.

    q, k, v: [batch, genes, heads, head_dim]; distance_table: [2 * max_positions - 1, head_dim];
    key_mask: [batch, genes] (1 gene, 0 padding). Returns context [batch, genes, heads, head_dim]
    and, if asked for and the implementation materialises them, probabilities
    [batch, heads, genes, genes] float32 (else None). Dropout (when `dropout_rng` is given) on an
    implementation without it is an `AttentionConfigError`, never silently skipped.
    """
    if relative not in kernels.RELATIVE_TYPES:
        raise kernels.AttentionConfigError(f"relative must be one of {kernels.RELATIVE_TYPES}, got {relative!r}")
    if dropout_rng is not None:
        kernels.check_dropout(implementation, dropout_rate)
    return kernels.load(implementation).attention(
        q, k, v, distance_table, key_mask, max_positions=max_positions, clip_distances=clip_distances,
        relative=relative, dropout_rate=dropout_rate, dropout_rng=dropout_rng, return_probs=return_probs)
