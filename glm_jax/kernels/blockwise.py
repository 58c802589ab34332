"""Blockwise relative attention in plain JAX: memory O(batch x heads x block x genes), any platform.

Queries are cut into blocks (the contig is padded to a multiple internally); a `lax.scan` over
them computes each block's scores against every key, [batch, heads, block, genes], so neither
[genes, genes] per head nor [genes, genes, head_dim] ever exists, and the softmax of a block is
exact (no online rescaling). q, k, v are transposed once to head-major [batch, heads, genes, d],
where the block matmuls need no layout changes.

Relative terms without the Transformer-XL 2x: the query block's q.D term reads the genes +
block - 1 distances it spans (one matmul, then `kernels.skew`), so it costs about as much as q.k.
The k.D term is taken per chunk of `key_chunk` keys against the block + chunk - 1 distances that
chunk spans (all chunks in one batched matmul): (block + chunk) / block times q.k's flops instead
of 2x. The distance rows of a block are one slice of a distance-indexed copy of the table, built
once per call.

A `jax.custom_vjp` saves only the output and the log-sum-exp per query; the backward pass is one
more scan over query blocks that recomputes each block's probabilities and transposes the score
function by hand (`_block_score_grads`): dq of the block is a scan output, dk, dv and the distance
gradient are carried (clipped distances accumulate into the table's end rows). Every backward
matmul contracts the last axis of its left operand, XLA:CPU's YNNPACK path (any other layout runs
as a slow plain dot): dk and dv are carried transposed, [B, H, d, keys], and q, dO and the key
chunks are transposed once per call, not per block.

Attention dropout is supported with the reference's semantics (normalised probabilities are
dropped and rescaled by 1 / (1 - rate)); the keep mask of query block i comes from fold_in(rng, i),
so it differs from the reference's draw for the same rng (`dense_dropout_mask` rebuilds it). No
probabilities are returned.

Measured on CPU (AMD EPYC, 2 threads, quiet machine; gLM-base heads 10 x 128, batch x genes = 8192,
float32; `python benchmarks/run.py attention --lengths 30,128,512,2048 --dtypes float32 --repeats 3`),
time of the reference / time: forward 1.53x at 512 genes, 2.48x at 2,048; forward+backward 0.94x at
512, 1.02x at 2,048; forward+backward compiled memory 1.31 GB at 2,048 (reference 7.8 GB). At 8,192
genes (batch 1) forward+backward takes 31 s in 1.31 GB, where the reference (104 GB) is skipped over
the 8 GB cap. docs/performance.md has the table.
What is left in the backward besides matmuls: the two skew transposes (pads) and the k.D term's
[chunks, ..., chunk, block] <-> [block, keys] transpose, one pass over a score-sized array each
per block.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import kernels
from glm_jax.model.dropout import keep_mask
from glm_jax.perf_defaults import platform_default

RETURNS_PROBS = False
SUPPORTS_DROPOUT = True


class _Tiling(NamedTuple):
    """Query blocks of `block` genes (`query_blocks` of them) and key chunks of `chunk` genes
    (`key_chunks`); block is a multiple of chunk."""
    block: int
    query_blocks: int
    chunk: int
    key_chunks: int

    @property
    def padded_queries(self) -> int:
        return self.block * self.query_blocks

    @property
    def padded_keys(self) -> int:
        return self.chunk * self.key_chunks


def tiling(num_genes: int, block_size: int, key_chunk: int) -> _Tiling:
    """Blocks of at most about `block_size` genes, as even as a multiple of the key chunk allows."""
    query_blocks = -(-num_genes // max(1, block_size))
    block = -(-num_genes // query_blocks)
    chunk = min(key_chunk, block)
    block = -(-block // chunk) * chunk
    return _Tiling(block, query_blocks, chunk, -(-num_genes // chunk))


class _Static(NamedTuple):
    tiling: _Tiling
    max_positions: int
    relative: str
    dropout_rate: float


def _chunk_windows(rows, tile: _Tiling):
    """Distance rows of each key chunk: [key_chunks + block / chunk, chunk, d] -> [key_chunks, block + chunk - 1, d].

    `rows` holds consecutive distances; chunk c starts (key_chunks - 1 - c) chunks in (later keys,
    smaller distances), so its window is the pieces p = 0 .. block / chunk of rows[key_chunks - 1 - c + p].
    """
    pieces = tile.block // tile.chunk + 1
    windows = jnp.stack([rows[p: p + tile.key_chunks][::-1] for p in range(pieces)], axis=1)
    return windows.reshape(tile.key_chunks, pieces * tile.chunk, rows.shape[-1])[:, :tile.block + tile.chunk - 1]


def _key_chunks(k, tile: _Tiling):
    """[B, H, keys, d] -> [key_chunks, B, H, chunk, d] (made once per call, outside the scans)."""
    return jnp.moveaxis(k.reshape(*k.shape[:2], tile.key_chunks, tile.chunk, k.shape[-1]), 2, 0)


def _window_views(window, static: _Static):
    """The distance rows the relative terms read: window [keys + block, d] -> (descending
    [keys + block - 1, d] for q.D, per-chunk windows [key_chunks, block + chunk - 1, d] for k.D)."""
    tile = static.tiling
    # query row a needs distances i0 + a - j, j = 0 .. keys-1: descending rows, skewed
    descending = window[:tile.padded_keys + tile.block - 1][::-1]
    # key row b of chunk c needs distances i0 - c * chunk + a - b, a = 0 .. block-1: ascending rows
    windows = _chunk_windows(window.reshape(-1, tile.chunk, window.shape[-1]), tile)
    return descending, windows


def _block_scores(q, k, chunks, window, static: _Static):
    """Scores / sqrt(d) of one query block against all keys, without the padding bias.

    q: [B, H, block, d] (genes i0 ...); k: [B, H, keys, d]; chunks: k as `_key_chunks`; window:
    [keys + block, d], D at distances i0 - keys + 1 ... i0 + block (the last row is not read)
    -> [B, H, block, keys] f32.
    """
    tile = static.tiling
    keys = k.shape[2]
    total = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    descending, windows = _window_views(window.astype(q.dtype), static)
    if static.relative != "none":
        total += kernels.skew(jnp.einsum("bhqd,md->bhqm", q, descending, preferred_element_type=jnp.float32), keys)
    if static.relative == "relative_key_query":
        per_chunk = kernels.skew(jnp.einsum("cbhkd,cmd->cbhkm", chunks, windows, preferred_element_type=jnp.float32),
                                 tile.block)  # [chunks, B, H, chunk, block]
        total += jnp.transpose(per_chunk, (1, 2, 4, 0, 3)).reshape(total.shape)
    return total / math.sqrt(q.shape[-1])


def _skew_transpose(g, rows_width: int):
    """Cotangent of `kernels.skew`: [..., R, n] -> [..., R, rows_width]."""
    skew_of = jax.linear_transpose(lambda x: kernels.skew(x, g.shape[-1]),
                                   jax.ShapeDtypeStruct((*g.shape[:-1], rows_width), g.dtype))
    return skew_of(g)[0]


def _canonical(product):
    """A transposed-layout matmul result kept as computed. Where the scan has one query block XLA
    removes the loop and folds the final [d, keys] -> [keys, d] swap into the matmul: off the fast
    path in float32, and for bf16 operands a dot XLA:CPU cannot run at all."""
    return jax.lax.optimization_barrier(product)


def _transposed(product):
    """Swaps the last two axes of a small matmul result. The barrier stops XLA from folding the
    swap into the matmul, which would then contract the large operand's leading axis, off
    XLA:CPU's fast (YNNPACK) path."""
    return jnp.swapaxes(_canonical(product), -1, -2)


class _BlockQueries(NamedTuple):
    """One query block in the layouts the backward matmuls read (all made once per call)."""
    q: jax.Array          # [B, H, block, d]
    q_t: jax.Array        # [B, H, d, block]
    q_flat_t: jax.Array   # [d, B * H * block]


def _block_score_grads(d_scores, queries: _BlockQueries, k, chunks_flat_t, window, static: _Static):
    """Transpose of `_block_scores` for d_scores [B, H, block, keys] f32.

    Every matmul has its contraction on the last axis of the left operand (XLA:CPU's fast path), so
    the key gradients come out transposed: returns (dq [B, H, block, d] f32, dk_t [B, H, d, keys] f32,
    dk_chunks [key_chunks, B * H * chunk, d] f32 or None, d_window [keys + block, d] f32; window may be
    bfloat16, as the model's distance table is in a bf16 run).
    chunks_flat_t: k as [key_chunks, d, B * H * chunk].
    """
    tile = static.tiling
    q = queries.q
    ds = (d_scores / math.sqrt(q.shape[-1])).astype(q.dtype)
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k, preferred_element_type=jnp.float32)
    dk_t = _canonical(jnp.einsum("bhdq,bhqk->bhdk", queries.q_t, ds, preferred_element_type=jnp.float32))
    views, views_vjp = jax.vjp(lambda w: _window_views(w, static), window)
    d_descending, d_windows, dk_chunks = jnp.zeros_like(views[0]), jnp.zeros_like(views[1]), None
    if static.relative != "none":
        descending = views[0].astype(q.dtype)
        d_relative = _skew_transpose(ds, descending.shape[0])  # [B, H, block, keys + block - 1]
        dq += jnp.einsum("bhqm,md->bhqd", d_relative, descending, preferred_element_type=jnp.float32)
        d_descending = _transposed(jnp.einsum("dn,nm->dm", queries.q_flat_t, d_relative.reshape(-1, descending.shape[0]),
                                              preferred_element_type=jnp.float32))
    if static.relative == "relative_key_query":
        windows = views[1].astype(q.dtype)
        per_chunk = jnp.transpose(ds.reshape(*ds.shape[:3], tile.key_chunks, tile.chunk), (3, 0, 1, 4, 2))
        d_key_part = _skew_transpose(per_chunk, windows.shape[1]).reshape(tile.key_chunks, -1, windows.shape[1])
        dk_chunks = jnp.einsum("cnm,cmd->cnd", d_key_part, windows, preferred_element_type=jnp.float32)
        d_windows = _transposed(jnp.einsum("cdn,cnm->cdm", chunks_flat_t, d_key_part, preferred_element_type=jnp.float32))
    (d_window,) = views_vjp((d_descending.astype(views[0].dtype), d_windows.astype(views[1].dtype)))
    return dq, dk_t, dk_chunks, d_window.astype(jnp.float32)


def _keep_scale(rng, query_block, shape, rate: float):
    """Dropout keep mask of one query block, already divided by 1 - rate."""
    keep = keep_mask(jax.random.fold_in(rng, query_block), rate, shape)
    return jnp.where(keep, np.float32(1.0 / (1.0 - rate)), np.float32(0.0))


@functools.partial(jax.jit, static_argnames=("batch", "heads", "num_genes", "rate", "block_size", "key_chunk"))
def dense_dropout_mask(rng, batch: int, heads: int, num_genes: int, rate: float, block_size: int | None = None,
                       key_chunk: int | None = None) -> jax.Array:
    """The keep mask `attention` draws, as [batch, heads, genes, genes] of 0 / (1 / (1 - rate)) (for tests)."""
    tile = tiling(num_genes, block_size or platform_default("attention_query_block"),
                  key_chunk or platform_default("attention_key_chunk"))
    per_block = jax.vmap(lambda i: _keep_scale(rng, i, (batch, heads, tile.block, tile.padded_keys), rate))(
        jnp.arange(tile.query_blocks))  # [query blocks, batch, heads, block, keys]
    dense = jnp.moveaxis(per_block, 0, 2).reshape(batch, heads, tile.padded_queries, tile.padded_keys)
    return dense[..., :num_genes, :num_genes]


def _distance_rows(distance_table, static: _Static):
    """D[i - j] for i - j = -(keys - 1) ... queries: [queries + keys, d]; query block i0's window
    starts at row i0."""
    tile = static.tiling
    distances = jnp.arange(-(tile.padded_keys - 1), tile.padded_queries + 1)
    return jnp.take(distance_table, kernels.distance_rows(distances, static.max_positions), axis=0)


def _window(rows, first_query, static: _Static):
    tile = static.tiling
    return jax.lax.dynamic_slice_in_dim(rows, first_query, tile.padded_keys + tile.block)


def _query_blocks(x, tile: _Tiling):
    """[B, H, queries, ...] -> [query blocks, B, H, block, ...]."""
    return jnp.moveaxis(x.reshape(*x.shape[:2], tile.query_blocks, tile.block, *x.shape[3:]), 2, 0)


def _as_block_output(x):
    """A query block's result as the scan stacks it: 16-bit floats as their uint16 bits. XLA:CPU
    rewrites a bf16 dynamic-update-slice inside a loop into a convert of the whole stacked buffer
    to f32 and back, once per block (traffic quadratic in the number of blocks); integers it
    updates in place. `_unblock` turns the bits back."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if jnp.dtype(x.dtype).itemsize == 2 else x


def _unblock(x, dtype=None):
    """[query blocks, B, H, block, ...] -> [B, H, queries, ...] (uint16 bits -> `dtype`)."""
    if x.dtype == jnp.uint16:
        x = jax.lax.bitcast_convert_type(x, dtype)
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3], *x.shape[4:])


def _forward(q, k, v, distance_table, bias, rng, static: _Static):
    """Returns (context [B, H, queries, d] in q's dtype, log-sum-exp [B, H, queries] f32)."""
    block = static.tiling.block
    rows = _distance_rows(distance_table, static)
    chunks = _key_chunks(k, static.tiling)

    def query_block(_, inputs):
        i, q_i = inputs
        logits = _block_scores(q_i, k, chunks, _window(rows, i * block, static), static) + bias
        row_max = logits.max(-1, keepdims=True)
        p = jnp.exp(logits - row_max)
        normaliser = p.sum(-1)
        if static.dropout_rate > 0:
            p = p * _keep_scale(rng, i, p.shape, static.dropout_rate)
        weighted = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        context = (weighted / normaliser[..., None]).astype(q.dtype)
        return None, (_as_block_output(context), row_max[..., 0] + jnp.log(normaliser))

    _, (context, lse) = jax.lax.scan(
        query_block, None, (jnp.arange(static.tiling.query_blocks), _query_blocks(q, static.tiling)))
    return _unblock(context, q.dtype), _unblock(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, distance_table, bias, rng, static: _Static):
    return _forward(q, k, v, distance_table, bias, rng, static)[0]


def _flash_fwd(q, k, v, distance_table, bias, rng, static: _Static):
    context, lse = _forward(q, k, v, distance_table, bias, rng, static)
    return context, (q, k, v, distance_table, bias, rng, context, lse)


def _flash_bwd(static: _Static, residuals, d_context):
    """Recomputes each block's probabilities from the saved log-sum-exp (FlashAttention-2 backward)."""
    q, k, v, distance_table, bias, rng, context, lse = residuals
    tile = static.tiling
    rows, rows_vjp = jax.vjp(lambda table: _distance_rows(table, static), distance_table)
    # delta_i = sum_j p_ij dp_ij = dO_i . O_i (with dropout too: O already holds the kept terms)
    delta = jnp.sum(d_context.astype(jnp.float32) * context.astype(jnp.float32), -1)  # [B, H, queries]

    chunks = _key_chunks(k, tile)
    # [key_chunks, d, B * H * chunk]: the contraction axis of the distance gradient last
    chunks_flat_t = jnp.transpose(chunks, (0, 4, 1, 2, 3)).reshape(tile.key_chunks, k.shape[-1], -1)
    q_blocks = _query_blocks(q, tile)  # [query blocks, B, H, block, d]
    queries = _BlockQueries(q_blocks, jnp.swapaxes(q_blocks, -1, -2),
                            jnp.moveaxis(q_blocks, -1, 1).reshape(tile.query_blocks, q.shape[-1], -1))
    # d_context blocks transposed outside the loop: inside it XLA folds the swap into the dot, off the fast path
    do_blocks = _query_blocks(d_context, tile)
    do_t_blocks = jnp.swapaxes(do_blocks, -1, -2)  # [query blocks, B, H, d, block]

    def query_block(carry, inputs):
        dk_t, dk_chunks, dv_t, d_rows = carry
        i, queries_i, do_i, do_t_i, lse_i, delta_i = inputs
        first = i * tile.block
        window = _window(rows, first, static)
        p = jnp.exp(_block_scores(queries_i.q, k, chunks, window, static) + bias - lse_i[..., None])
        dp = jnp.einsum("bhqd,bhkd->bhqk", do_i, v, preferred_element_type=jnp.float32)
        kept = p
        if static.dropout_rate > 0:
            keep = _keep_scale(rng, i, p.shape, static.dropout_rate)
            kept, dp = p * keep, dp * keep
        dv_t += _canonical(jnp.einsum("bhdq,bhqk->bhdk", do_t_i, kept.astype(do_i.dtype),
                                      preferred_element_type=jnp.float32))
        dq_i, dk_t_part, dk_chunks_part, d_window = _block_score_grads(
            p * (dp - delta_i[..., None]), queries_i, k, chunks_flat_t, window, static)
        if dk_chunks_part is not None:
            dk_chunks += dk_chunks_part
        d_rows = jax.lax.dynamic_update_slice_in_dim(d_rows, _window(d_rows, first, static) + d_window, first, 0)
        return (dk_t + dk_t_part, dk_chunks, dv_t, d_rows), _as_block_output(dq_i.astype(q.dtype))

    transposed_keys = jnp.zeros((*k.shape[:2], k.shape[3], k.shape[2]), jnp.float32)  # [B, H, d, keys]
    init = (transposed_keys, jnp.zeros((tile.key_chunks, chunks_flat_t.shape[-1], k.shape[-1]), jnp.float32),
            transposed_keys, jnp.zeros(rows.shape, jnp.float32))
    blocks = (jnp.arange(tile.query_blocks), queries, do_blocks, do_t_blocks) + tuple(_query_blocks(x, tile) for x in (lse, delta))
    (dk_t, dk_chunks, dv_t, d_rows), dq = jax.lax.scan(query_block, init, blocks)
    # dk_chunks [key_chunks, B * H * chunk, d] -> [B, H, keys, d]
    dk_chunks = jnp.moveaxis(dk_chunks.reshape(tile.key_chunks, *k.shape[:2], tile.chunk, k.shape[-1]), 0, 2)
    dk = jnp.swapaxes(dk_t, -1, -2) + dk_chunks.reshape(k.shape)
    (d_table,) = rows_vjp(d_rows.astype(rows.dtype))
    rng_cotangent = np.zeros(np.shape(rng), jax.dtypes.float0)
    return (_unblock(dq, q.dtype), dk.astype(k.dtype), jnp.swapaxes(dv_t, -1, -2).astype(v.dtype),
            d_table.astype(distance_table.dtype), jnp.zeros_like(bias), rng_cotangent)


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(q, k, v, distance_table, key_mask, *, max_positions: int, clip_distances: bool, relative: str,
              dropout_rate: float = 0.0, dropout_rng=None, return_probs: bool = False,
              block_size: int | None = None, key_chunk: int | None = None):
    """See `glm_jax.kernels`. `block_size`: genes per query block (rounded to a multiple of the key
    chunk), `key_chunk`: keys per chunk of the k.D term (static; default: the platform's
    `attention_query_block` / `attention_key_chunk` in glm_jax.perf_defaults).

    Returns (context [batch, genes, heads, head_dim] in q's dtype, None).
    """
    num_genes = q.shape[1]
    kernels.check_length(num_genes, max_positions, clip_distances)
    tile = tiling(num_genes, block_size or platform_default("attention_query_block"),
                  key_chunk or platform_default("attention_key_chunk"))
    # Padding keys of the contig get the reference's finfo.min; the chunk padding beyond the contig
    # gets -inf, so it carries no weight even in a row whose keys are all padding.
    bias = jnp.where(jnp.arange(tile.padded_keys) < num_genes,
                     jnp.pad(kernels.key_bias(key_mask), ((0, 0),) * 3 + ((0, tile.padded_keys - num_genes),)),
                     -jnp.inf)

    def head_major(x, length):  # [B, S, H, d] -> [B, H, length, d], zero padded
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, length - num_genes), (0, 0)))

    rate = float(dropout_rate) if dropout_rng is not None else 0.0
    if rate > 0 and jnp.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key):
        dropout_rng = jax.random.key_data(dropout_rng)
    rng = dropout_rng if rate > 0 else jnp.zeros((2,), jnp.uint32)
    context = _flash(head_major(q, tile.padded_queries), head_major(k, tile.padded_keys),
                     head_major(v, tile.padded_keys), distance_table, bias, rng,
                     _Static(tile, max_positions, relative, rate))
    return jnp.swapaxes(context[:, :, :num_genes], 1, 2), None
