"""Flash-attention-style relative attention in plain JAX: memory O(genes x block), any platform.

Queries and keys are cut into blocks of `block_size` genes (the contig is padded to a multiple
internally). For each query block a `lax.scan` over key blocks keeps a running max, normaliser and
weighted sum (online softmax); the relative terms of a block come from the block_q + block_k - 1
distance rows it spans (`kernels.relative_scores`), so neither [S, S] nor [S, S, d] ever exists.
A `jax.custom_vjp` saves only the output and the log-sum-exp per query; the backward pass
recomputes each block's probabilities and takes the block's score gradient with `jax.vjp` of the
same score function, which gives q, k and distance-table gradients (clipped distances accumulate
into the table's end rows).

Attention dropout is supported with the reference's semantics (normalised probabilities are
dropped and rescaled by 1 / (1 - rate)); the keep mask of block (i, j) comes from
fold_in(fold_in(rng, i), j), so it differs from the reference's draw for the same rng
(`dense_dropout_mask` rebuilds it). No probabilities are returned.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import kernels

RETURNS_PROBS = False
SUPPORTS_DROPOUT = True
DEFAULT_BLOCK_SIZE = 512


class _Static(NamedTuple):
    block: int
    max_positions: int
    relative: str
    dropout_rate: float


def _block_logits(q, k, distance_table, first_query, first_key, static: _Static):
    """Scores / sqrt(d) of one block, without the padding bias: [batch, heads, block_q, block_k] f32."""
    total = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if static.relative != "none":
        total += kernels.relative_scores(q, k, distance_table, first_query, first_key, static.max_positions,
                                         static.relative)
    return total / math.sqrt(q.shape[-1])


def _keep_scale(rng, query_block, key_block, shape, rate: float):
    """Dropout keep mask of one block, already divided by 1 - rate."""
    key = jax.random.fold_in(jax.random.fold_in(rng, query_block), key_block)
    return jax.random.bernoulli(key, 1.0 - rate, shape).astype(jnp.float32) / (1.0 - rate)


@functools.partial(jax.jit, static_argnames=("batch", "heads", "num_genes", "rate", "block_size"))
def dense_dropout_mask(rng, batch: int, heads: int, num_genes: int, rate: float,
                       block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
    """The keep mask `attention` draws, as [batch, heads, genes, genes] of 0 / (1 / (1 - rate)) (for tests)."""
    block = min(block_size, num_genes)
    blocks = jnp.arange(-(-num_genes // block))
    per_block = jax.vmap(lambda i: jax.vmap(lambda j: _keep_scale(rng, i, j, (batch, heads, block, block), rate))(
        blocks))(blocks)  # [query blocks, key blocks, batch, heads, block, block]
    side = len(blocks) * block
    dense = per_block.transpose(2, 3, 0, 4, 1, 5).reshape(batch, heads, side, side)
    return dense[..., :num_genes, :num_genes]


def _blocks(x, block: int):
    """[batch, genes, ...] -> [genes / block, batch, block, ...]."""
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:]), 1, 0)


def _unblocks(x):
    """[blocks, batch, block, ...] -> [batch, blocks * block, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _forward(q, k, v, distance_table, bias, rng, static: _Static):
    """Online softmax. Returns (context [B, S, H, d] in q's dtype, log-sum-exp [B, S, H] f32)."""
    block = static.block
    batch, _, heads, head_dim = q.shape
    key_blocks = (jnp.arange(k.shape[1] // block), _blocks(k, block), _blocks(v, block), _blocks(bias, block))

    def query_block(_, query_inputs):
        i, q_i = query_inputs

        def key_step(carry, key_inputs):
            running_max, normaliser, weighted = carry
            j, k_j, v_j, bias_j = key_inputs
            logits = _block_logits(q_i, k_j, distance_table, i * block, j * block, static) + bias_j[:, None, None, :]
            new_max = jnp.maximum(running_max, logits.max(-1))
            p = jnp.exp(logits - new_max[..., None])
            correction = jnp.exp(running_max - new_max)
            normaliser = normaliser * correction + p.sum(-1)
            if static.dropout_rate > 0:
                p = p * _keep_scale(rng, i, j, p.shape, static.dropout_rate)
            weighted = weighted * correction[..., None] + jnp.einsum(
                "bhqk,bkhd->bhqd", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
            return (new_max, normaliser, weighted), None

        init = (jnp.full((batch, heads, block), -jnp.inf, jnp.float32), jnp.zeros((batch, heads, block), jnp.float32),
                jnp.zeros((batch, heads, block, head_dim), jnp.float32))
        (running_max, normaliser, weighted), _ = jax.lax.scan(key_step, init, key_blocks)
        context = (weighted / normaliser[..., None]).astype(q.dtype)
        return None, (jnp.swapaxes(context, 1, 2), jnp.swapaxes(running_max + jnp.log(normaliser), 1, 2))

    _, (context, lse) = jax.lax.scan(query_block, None, (jnp.arange(q.shape[1] // block), _blocks(q, block)))
    return _unblocks(context), _unblocks(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, distance_table, bias, rng, static: _Static):
    return _forward(q, k, v, distance_table, bias, rng, static)[0]


def _flash_fwd(q, k, v, distance_table, bias, rng, static: _Static):
    context, lse = _forward(q, k, v, distance_table, bias, rng, static)
    return context, (q, k, v, distance_table, bias, rng, context, lse)


def _flash_bwd(static: _Static, residuals, d_context):
    """Recomputes each block's probabilities from the saved log-sum-exp (FlashAttention-2 backward)."""
    q, k, v, distance_table, bias, rng, context, lse = residuals
    block = static.block
    # delta_i = sum_j p_ij dp_ij = dO_i . O_i (with dropout too: O already holds the kept terms)
    delta = jnp.sum(d_context.astype(jnp.float32) * context.astype(jnp.float32), -1)  # [B, S, H]
    query_blocks = (jnp.arange(q.shape[1] // block), _blocks(q, block), _blocks(d_context, block),
                    _blocks(lse, block), _blocks(delta, block))

    def key_block(carry, key_inputs):
        dq, d_table = carry
        j, k_j, v_j, bias_j = key_inputs

        def query_step(inner, query_inputs):
            dk_j, dv_j, dq, d_table = inner
            i, q_i, do_i, lse_i, delta_i = query_inputs
            logits, logits_vjp = jax.vjp(
                lambda q_, k_, table_: _block_logits(q_, k_, table_, i * block, j * block, static),
                q_i, k_j, distance_table)
            p = jnp.exp(logits + bias_j[:, None, None, :] - jnp.swapaxes(lse_i, 1, 2)[..., None])
            dp = jnp.einsum("bqhd,bkhd->bhqk", do_i, v_j, preferred_element_type=jnp.float32)
            kept = p
            if static.dropout_rate > 0:
                keep = _keep_scale(rng, i, j, p.shape, static.dropout_rate)
                kept, dp = p * keep, dp * keep
            dv_j = dv_j + jnp.einsum("bhqk,bqhd->bkhd", kept.astype(do_i.dtype), do_i,
                                     preferred_element_type=jnp.float32)
            d_logits = p * (dp - jnp.swapaxes(delta_i, 1, 2)[..., None])
            dq_i, dk_part, d_table_part = logits_vjp(d_logits)
            dq = dq.at[i].add(dq_i.astype(jnp.float32))
            return (dk_j + dk_part.astype(jnp.float32), dv_j, dq, d_table + d_table_part.astype(jnp.float32)), None

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        (dk_j, dv_j, dq, d_table), _ = jax.lax.scan(query_step, (zeros, zeros, dq, d_table), query_blocks)
        return (dq, d_table), (dk_j, dv_j)

    init = (jnp.zeros((q.shape[1] // block, q.shape[0], block, *q.shape[2:]), jnp.float32),
            jnp.zeros(distance_table.shape, jnp.float32))
    key_blocks = (jnp.arange(k.shape[1] // block), _blocks(k, block), _blocks(v, block), _blocks(bias, block))
    (dq, d_table), (dk, dv) = jax.lax.scan(key_block, init, key_blocks)
    rng_cotangent = np.zeros(np.shape(rng), jax.dtypes.float0)
    return (_unblocks(dq).astype(q.dtype), _unblocks(dk).astype(k.dtype), _unblocks(dv).astype(v.dtype),
            d_table.astype(distance_table.dtype), jnp.zeros_like(bias), rng_cotangent)


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(q, k, v, distance_table, key_mask, *, max_positions: int, clip_distances: bool, relative: str,
              dropout_rate: float = 0.0, dropout_rng=None, return_probs: bool = False,
              block_size: int = DEFAULT_BLOCK_SIZE):
    """See `glm_jax.kernels`; `block_size` genes per query/key block (static).

    Returns (context [batch, genes, heads, head_dim] in q's dtype, None).
    """
    batch, num_genes = q.shape[:2]
    kernels.check_length(num_genes, max_positions, clip_distances)
    block = min(block_size, num_genes)
    padded = -(-num_genes // block) * block
    # Padding keys of the contig get the reference's finfo.min; the block padding beyond the contig
    # gets -inf, so it carries no weight even in a row whose keys are all padding.
    bias = jnp.where(jnp.arange(padded) < num_genes,
                     jnp.pad(kernels.key_bias(key_mask)[:, 0, 0, :], ((0, 0), (0, padded - num_genes))),
                     -jnp.inf)
    pad = ((0, 0), (0, padded - num_genes), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    rate = float(dropout_rate) if dropout_rng is not None else 0.0
    if rate > 0 and jnp.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key):
        dropout_rng = jax.random.key_data(dropout_rng)
    rng = dropout_rng if rate > 0 else jnp.zeros((2,), jnp.uint32)
    context = _flash(q, k, v, distance_table, bias, rng, _Static(block, max_positions, relative, rate))
    return context[:, :num_genes], None
