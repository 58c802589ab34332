"""Flash attention with gLM's relative_key_query terms computed inside a Pallas kernel.

Computes the attention seam's function (see `glm_jax/kernels/__init__.py`)

    scores[b,h,i,j] = (q_i.k_j + q_i.D[i-j] + k_j.D[i-j]) / sqrt(head_dim) + bias[b,j]
    context = softmax_j(scores) @ v

without ever holding a [genes, genes] array: a program owns one (query block, key block) tile at
a time, with an online softmax across key blocks (FlashAttention-2). The relative terms are built
inside the tile: the distances i - j of a tile with query rows [qi0, qi0+B) and key rows [kj0, kj0+B)
span qi0-kj0-B+1 .. qi0-kj0+B-1, so the tile loads those 2B table rows ("window", [2B, head_dim]),
computes q @ window^T and k @ window^T ([B, 2B] each, matrix units) and moves every entry to its
(i, j) place with a one-hot select-and-sum over the window axis (column i - j + B - 1): the skew
needs no gather and no reshape, which keeps the kernel within what Triton lowers. Its price is
B x B x 2B selects per tile and term on the vector units (2B/head_dim times the q.k matmul's
multiply-adds, on slower units): the reason for the small default block (32), and the first
thing to measure and replace (e.g. by a gather-load from a scratch buffer) on a GPU.

Backward (custom_vjp) runs three kernels that recompute each tile's probabilities from the saved
row max and sum: dq (one program per query block), dk/dv (one per key block) and d(window) (one per
tile diagonal qb - kb: every tile on a diagonal reads the same window, so each program sums its
diagonal without atomics; the overlapping windows are added into the table's gradient outside).
Saved for the backward: q, k, v, the output and two [batch, heads, genes] float32 rows; the
d(window) partials are [heads, 2 genes / B, 2B, head_dim] float32, linear in the genes.

Outside the kernels, in plain JAX and linear in the number of genes: genes padded to a multiple
of the block (padded keys get bias -inf, padded queries are dropped), head_dim zero-padded to a
power of two >= 16 (Triton's dot and tensor sizes need it), and the table "extended" to one row
per distance -(S'-1)..S' of the padded length S' (row t is distance t - S' + 1, clipped to the
table's last rows when clip_distances, Shaw et al. 2018); autodiff of that gather carries the
window gradients back to the [2P-1, head_dim] table.

Under an active mesh (`sharding.use_mesh`, as in training) the kernels run per device through
shard_map over batch and heads: a pallas_call has no SPMD partitioning rule, so plain jit would
gather the whole batch onto every device.

Attention dropout uses a counter-based hash of (seed, batch, head, query, key), so the same keep
mask is rebuilt in the backward kernels without storing it; `dropout_keep_mask` exposes it.

Platforms: `interpret=True` (chosen automatically on CPU) runs the kernels through Pallas's
interpreter and is what the tests check, against the materialising reference. The GPU path
(Triton lowering via `pl.pallas_call` + BlockSpecs) is written to the Triton lowering's
constraints (2-D dots, power-of-two tensor shapes, no gathers) and its lowering to Triton IR is
checked on CPU by the tests (jax.export for CUDA), but it has not been compiled or run on a GPU in
this project. TPU (Mosaic) is not supported: the calls pass Triton compiler parameters, and a
Mosaic version (whose block and layout rules differ) was neither written nor tried.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from glm_jax import kernels, sharding

RETURNS_PROBS = False  # the point of the kernel: no [batch, heads, genes, genes] array
SUPPORTS_DROPOUT = True
DEFAULT_BLOCK = 32
_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Compile-time options of one kernel instance."""

    block: int
    relative: str
    scale: float
    dropout_rate: float
    interpret: bool

    @property
    def compiler_params(self):
        # Triton explicitly: jax 0.10 sends a plain pallas_call on GPU to Mosaic GPU by default
        return None if self.interpret else pl_triton.CompilerParams(num_warps=4, num_stages=2)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _dot(a, b, contract=((1,), (0,))):
    """2-D matmul with float32 accumulation; `contract` = (a's axes, b's axes)."""
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _onehot(block: int) -> jax.Array:
    """[block(i), block(j), 2*block(c)] bool: c == i - j + block - 1, the window column of D[i-j]."""
    shape = (block, block, 2 * block)
    i = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    j = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    c = jax.lax.broadcasted_iota(jnp.int32, shape, 2)
    return c == i - j + (block - 1)


def _skew_rows(x_ic: jax.Array, onehot: jax.Array) -> jax.Array:
    """[i, c] -> [i, j]: out[i, j] = x[i, i - j + B - 1] (query-side relative term)."""
    return jnp.sum(jnp.where(onehot, x_ic[:, None, :], 0.0), axis=2)


def _skew_cols(x_jc: jax.Array, onehot: jax.Array) -> jax.Array:
    """[j, c] -> [i, j]: out[i, j] = x[j, i - j + B - 1] (key-side relative term)."""
    return jnp.sum(jnp.where(onehot, x_jc[None, :, :], 0.0), axis=2)


def _unskew_rows(g_ij: jax.Array, onehot: jax.Array) -> jax.Array:
    """Transpose of `_skew_rows`: [i, j] -> [i, c]."""
    return jnp.sum(jnp.where(onehot, g_ij[:, :, None], 0.0), axis=1)


def _unskew_cols(g_ij: jax.Array, onehot: jax.Array) -> jax.Array:
    """Transpose of `_skew_cols`: [i, j] -> [j, c]."""
    return jnp.sum(jnp.where(onehot, g_ij[:, :, None], 0.0), axis=0)


def _hash_uint32(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection on uint32 that mixes every input bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _keep(seed, b, h, i, j, num_heads: int, rate: float) -> jax.Array:
    """Dropout keep mask for query rows i and key columns j (uint32 arrays that broadcast).

    Counter (b, h, i, j) hashed twice with the seed in between; keep when hash >= rate * 2^32.
    """
    row = (jnp.asarray(b, jnp.uint32) * jnp.uint32(num_heads) + jnp.asarray(h, jnp.uint32)) * jnp.uint32(0x9E3779B1)
    x = _hash_uint32(row + i.astype(jnp.uint32) * jnp.uint32(0x632BE5AB) + seed)
    x = _hash_uint32(x ^ (j.astype(jnp.uint32) * jnp.uint32(0x2545F491)))
    return x >= jnp.uint32(min(int(rate * 2.0 ** 32), 2 ** 32 - 1))


def dropout_keep_mask(seed: jax.Array, batch: int, heads: int, genes: int, rate: float) -> jax.Array:
    """The keep mask the kernels use, materialised: [batch, heads, genes(query), genes(key)] bool."""
    b = jnp.arange(batch, dtype=jnp.uint32)[:, None, None, None]
    h = jnp.arange(heads, dtype=jnp.uint32)[None, :, None, None]
    i = jnp.arange(genes, dtype=jnp.uint32)[None, None, :, None]
    j = jnp.arange(genes, dtype=jnp.uint32)[None, None, None, :]
    return _keep(jnp.asarray(seed, jnp.uint32), b, h, i, j, heads, rate)


def _tile_scores(q, k, window_ref, bias, qi0, kj0, st: _Static, onehot):
    """Scaled, biased scores of one tile [B(i), B(j)] float32, plus the window (or None)."""
    s = _dot(q, k, ((1,), (1,)))
    window = None
    if st.relative != "none":
        # rows of the extended table for distances qi0-kj0-B+1 .. qi0-kj0+B (see `_extended_table`)
        start = qi0 - kj0 + window_ref.shape[0] // 2 - st.block
        window = window_ref[pl.ds(start, 2 * st.block), :]
        s += _skew_rows(_dot(q, window, ((1,), (1,))), onehot)
        if st.relative == "relative_key_query":
            s += _skew_cols(_dot(k, window, ((1,), (1,))), onehot)
    return s * st.scale + bias[None, :], window


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, window_ref, bias_ref, o_ref, max_ref, sum_ref, *, st: _Static):
    b, h, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_heads = pl.num_programs(1)
    block = st.block
    qi0 = qb * block
    q = q_ref[...]
    onehot = _onehot(block)
    rows = qi0 + jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)

    def body(kb, carry):
        m, l, acc = carry
        kj0 = kb * block
        k = k_ref[pl.ds(kj0, block), :]
        v = v_ref[pl.ds(kj0, block), :]
        s, _ = _tile_scores(q, k, window_ref, bias_ref[pl.ds(kj0, block)], qi0, kj0, st, onehot)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        l = l * alpha + jnp.sum(p, axis=1)
        if st.dropout_rate > 0.0:
            cols = kj0 + jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
            keep = _keep(seed_ref[0], b, h, rows, cols, num_heads, st.dropout_rate)
            p = jnp.where(keep, p / (1.0 - st.dropout_rate), 0.0)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return m_new, l, acc

    init = (jnp.full((block,), _NEG_INF, jnp.float32), jnp.zeros((block,), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, k_ref.shape[0] // block, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    # the row max and sum, not their log-sum-exp: a contig of only padding has m = finfo.min, which
    # would absorb log(l) (HF's finite mask makes such rows uniform, and so must the backward)
    max_ref[...] = m
    sum_ref[...] = l


def _tile_grads(seed, b, h, num_heads, q, k, v, do, row_max, row_sum, delta, window_ref, bias, qi0, kj0, st,
                onehot):
    """Recomputes one tile from the forward's row max and sum. Returns (dS = d loss / d pre-scale
    scores [i, j] float32, the dropped probabilities that multiplied v [i, j], the window or None)."""
    s, window = _tile_scores(q, k, window_ref, bias, qi0, kj0, st, onehot)
    p = jnp.exp(s - row_max[:, None]) / row_sum[:, None]
    dp = _dot(do, v, ((1,), (1,)))
    p_dropped = p
    if st.dropout_rate > 0.0:
        shape = (st.block, st.block)
        rows = qi0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        cols = kj0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        keep = _keep(seed, b, h, rows, cols, num_heads, st.dropout_rate)
        p_dropped = jnp.where(keep, p / (1.0 - st.dropout_rate), 0.0)
        dp = jnp.where(keep, dp / (1.0 - st.dropout_rate), 0.0)
    return p * (dp - delta[:, None]) * st.scale, p_dropped, window


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, window_ref, bias_ref, do_ref, max_ref, sum_ref, delta_ref, dq_ref, *,
               st: _Static):
    b, h, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block, qi0 = st.block, qb * st.block
    q, do, row_max, row_sum, delta = q_ref[...], do_ref[...], max_ref[...], sum_ref[...], delta_ref[...]
    onehot = _onehot(block)

    def body(kb, dq):
        kj0 = kb * block
        k = k_ref[pl.ds(kj0, block), :]
        v = v_ref[pl.ds(kj0, block), :]
        ds, _, window = _tile_grads(seed_ref[0], b, h, pl.num_programs(1), q, k, v, do, row_max, row_sum, delta,
                                    window_ref, bias_ref[pl.ds(kj0, block)], qi0, kj0, st, onehot)
        dq += _dot(ds.astype(k.dtype), k)
        if window is not None:
            dq += _dot(_unskew_rows(ds, onehot).astype(window.dtype), window)
        return dq

    dq = jax.lax.fori_loop(0, k_ref.shape[0] // block, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(seed_ref, q_ref, k_ref, v_ref, window_ref, bias_ref, do_ref, max_ref, sum_ref, delta_ref,
                 dk_ref, dv_ref, *, st: _Static):
    b, h, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block, kj0 = st.block, kb * st.block
    k, v = k_ref[...], v_ref[...]
    bias = bias_ref[pl.ds(kj0, block)]
    onehot = _onehot(block)

    def body(qb, carry):
        dk, dv = carry
        qi0 = qb * block
        q = q_ref[pl.ds(qi0, block), :]
        do = do_ref[pl.ds(qi0, block), :]
        row_max = max_ref[pl.ds(qi0, block)]
        row_sum = sum_ref[pl.ds(qi0, block)]
        delta = delta_ref[pl.ds(qi0, block)]
        ds, p_dropped, window = _tile_grads(seed_ref[0], b, h, pl.num_programs(1), q, k, v, do, row_max, row_sum,
                                            delta, window_ref, bias, qi0, kj0, st, onehot)
        dv += _dot(p_dropped.astype(do.dtype), do, ((0,), (0,)))
        dk += _dot(ds.astype(q.dtype), q, ((0,), (0,)))
        if st.relative == "relative_key_query":
            dk += _dot(_unskew_cols(ds, onehot).astype(window.dtype), window)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // block, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dwindow_kernel(seed_ref, q_ref, k_ref, v_ref, window_ref, bias_ref, do_ref, max_ref, sum_ref, delta_ref, dwin_ref,
                    *, st: _Static):
    """One program per (head, tile diagonal qb - kb): sums d(window) over the diagonal's tiles and
    over the batch. Refs hold every batch row: q/k/v/do [batch, genes, head_dim]."""
    h, diagonal = pl.program_id(0), pl.program_id(1)
    block = st.block
    num_blocks = q_ref.shape[1] // block
    offset = diagonal - (num_blocks - 1)  # qb - kb
    first_kb = jnp.maximum(0, -offset)
    count = num_blocks - jnp.abs(offset)
    onehot = _onehot(block)

    def tile(n, carry):
        b = n // count
        kb = first_kb + n % count
        qb = kb + offset
        qi0, kj0 = qb * block, kb * block
        q = q_ref[b, pl.ds(qi0, block), :]
        k = k_ref[b, pl.ds(kj0, block), :]
        v = v_ref[b, pl.ds(kj0, block), :]
        do = do_ref[b, pl.ds(qi0, block), :]
        rows = pl.ds(qi0, block)
        ds, _, _ = _tile_grads(seed_ref[0], b, h, pl.num_programs(0), q, k, v, do, max_ref[b, rows], sum_ref[b, rows],
                               delta_ref[b, rows], window_ref, bias_ref[b, pl.ds(kj0, block)], qi0, kj0, st, onehot)
        carry += _dot(_unskew_rows(ds, onehot).astype(q.dtype), q, ((0,), (0,)))
        if st.relative == "relative_key_query":
            carry += _dot(_unskew_cols(ds, onehot).astype(k.dtype), k, ((0,), (0,)))
        return carry

    batch = q_ref.shape[0]
    dwin = jax.lax.fori_loop(0, batch * count, tile, jnp.zeros(dwin_ref.shape, jnp.float32))
    dwin_ref[...] = dwin


def _specs(batch: int, genes: int, dim: int, block: int):
    """BlockSpecs on [batch, genes, heads, dim] arrays / [batch, heads, genes] rows, grid (b, h, block)."""
    tile = pl.BlockSpec((None, block, None, dim), lambda b, h, i: (b, i, h, 0))
    whole = pl.BlockSpec((None, genes, None, dim), lambda b, h, i: (b, 0, h, 0))
    row_tile = pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))
    row_whole = pl.BlockSpec((None, None, genes), lambda b, h, i: (b, h, 0))
    return tile, whole, row_tile, row_whole


def _common_specs(window_shape, genes):
    seed = pl.BlockSpec((1,), lambda *_: (0,))
    window = pl.BlockSpec(window_shape, lambda *_: (0, 0))
    bias = pl.BlockSpec((None, genes), lambda b, *_: (b, 0))
    return seed, window, bias


def _forward(st: _Static, seed, q, k, v, window_table, bias):
    batch, genes, heads, dim = q.shape
    tile, whole, row_tile, _ = _specs(batch, genes, dim, st.block)
    seed_spec, window_spec, bias_spec = _common_specs(window_table.shape, genes)
    return pl.pallas_call(
        functools.partial(_forward_kernel, st=st),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, genes), jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, genes), jnp.float32)),
        grid=(batch, heads, genes // st.block),
        in_specs=[seed_spec, tile, whole, whole, window_spec, bias_spec],
        out_specs=(tile, row_tile, row_tile),
        interpret=st.interpret, compiler_params=st.compiler_params,
        name="glm_flash_forward",
    )(seed, q, k, v, window_table, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, seed, q, k, v, window_table, bias):
    return _forward(st, seed, q, k, v, window_table, bias)[0]


def _flash_fwd(st, seed, q, k, v, window_table, bias):
    out, row_max, row_sum = _forward(st, seed, q, k, v, window_table, bias)
    return out, (seed, q, k, v, window_table, bias, out, row_max, row_sum)


def _flash_bwd(st, residuals, d_out):
    seed, q, k, v, window_table, bias, out, row_max, row_sum = residuals
    batch, genes, heads, dim = q.shape
    block = st.block
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i (dropout included, since O used the dropped P)
    delta = jnp.einsum("bshd,bshd->bhs", d_out.astype(jnp.float32), out.astype(jnp.float32))
    tile, whole, row_tile, row_whole = _specs(batch, genes, dim, block)
    seed_spec, window_spec, bias_spec = _common_specs(window_table.shape, genes)
    operands = (seed, q, k, v, window_table, bias, d_out, row_max, row_sum, delta)
    grid = (batch, heads, genes // block)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=grid,
        in_specs=[seed_spec, tile, whole, whole, window_spec, bias_spec, tile, row_tile, row_tile, row_tile],
        out_specs=tile, interpret=st.interpret, compiler_params=st.compiler_params, name="glm_flash_dq",
    )(*operands)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=grid,
        in_specs=[seed_spec, whole, tile, tile, window_spec, bias_spec, whole, row_whole, row_whole, row_whole],
        out_specs=(tile, tile), interpret=st.interpret, compiler_params=st.compiler_params, name="glm_flash_dkdv",
    )(*operands)
    if st.relative == "none":
        d_table = jnp.zeros_like(window_table)
    else:
        num_diagonals = 2 * (genes // block) - 1
        every_batch = pl.BlockSpec((batch, genes, None, dim), lambda h, t: (0, 0, h, 0))
        every_row = pl.BlockSpec((batch, None, genes), lambda h, t: (0, h, 0))
        d_windows = pl.pallas_call(
            functools.partial(_dwindow_kernel, st=st),
            out_shape=jax.ShapeDtypeStruct((heads, num_diagonals, 2 * block, dim), jnp.float32),
            grid=(heads, num_diagonals),
            in_specs=[pl.BlockSpec((1,), lambda *_: (0,)), every_batch, every_batch, every_batch,
                      pl.BlockSpec(window_table.shape, lambda *_: (0, 0)),
                      pl.BlockSpec((batch, genes), lambda *_: (0, 0)), every_batch, every_row, every_row, every_row],
            out_specs=pl.BlockSpec((None, None, 2 * block, dim), lambda h, t: (h, t, 0, 0)),
            interpret=st.interpret, compiler_params=st.compiler_params, name="glm_flash_dwindow",
        )(*operands).sum(0)
        # diagonal t's window covers extended rows [t*B, t*B + 2B): add the overlapping halves
        first, second = d_windows[:, :block], d_windows[:, block:]
        d_table = (jnp.pad(first, ((0, 1), (0, 0), (0, 0))) + jnp.pad(second, ((1, 0), (0, 0), (0, 0))))
        d_table = d_table.reshape(window_table.shape).astype(window_table.dtype)
    return None, dq, dk, dv, d_table, jnp.zeros_like(bias)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _extended_table(distance_table, padded_genes: int, max_positions: int, dtype) -> jax.Array:
    """[2 * padded_genes, head_dim]: row t holds D[t - padded_genes + 1], distances clipped to
    +-(max_positions - 1) (the table's end rows; beyond the contig they are never used unclipped)."""
    distances = jnp.arange(2 * padded_genes) - (padded_genes - 1)
    rows = jnp.clip(distances, -(max_positions - 1), max_positions - 1) + max_positions - 1
    return distance_table[rows].astype(dtype)


def _padded_head_dim(dim: int) -> int:
    return max(16, 1 << (dim - 1).bit_length())


def attention(q, k, v, distance_table, key_mask, *, max_positions: int, clip_distances: bool, relative: str,
              dropout_rate: float = 0.0, dropout_rng=None, return_probs: bool = False,
              block_size: int = DEFAULT_BLOCK, interpret: Optional[bool] = None):
    """The seam's attention in Pallas kernels (never materialises probabilities: returns (context, None)).

    q, k, v: [batch, genes, heads, head_dim]; distance_table: [2*max_positions-1, head_dim];
    key_mask: [batch, genes] (1 gene, 0 padding). block_size: query/key block (a power of two >= 16
    for Triton). interpret: run Pallas's interpreter (default: when the backend is CPU).
    Returns context [batch, genes, heads, head_dim] in q.dtype and None.
    """
    del return_probs  # probabilities are never materialised here
    if relative not in kernels.RELATIVE_TYPES:
        raise kernels.AttentionConfigError(f"relative must be one of {kernels.RELATIVE_TYPES}, got {relative!r}")
    batch, genes, heads, dim = q.shape
    if relative != "none" and distance_table.shape != (2 * max_positions - 1, dim):
        raise kernels.AttentionConfigError(f"distance_table shape {distance_table.shape} does not match "
                         f"(2*max_positions-1, head_dim) = {(2 * max_positions - 1, dim)}")
    if relative != "none":
        kernels.check_length(genes, max_positions, clip_distances)
    if block_size < 16 or block_size & (block_size - 1):
        raise kernels.AttentionConfigError(f"block_size must be a power of two >= 16, got {block_size}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    rate = float(dropout_rate) if dropout_rng is not None else 0.0
    if rate:
        seed = jax.random.bits(dropout_rng, (1,), jnp.uint32)
    else:
        seed = jnp.zeros((1,), jnp.uint32)

    padded_genes = _round_up(genes, block_size)
    padded_dim = _padded_head_dim(dim)
    pad = ((0, 0), (0, padded_genes - genes), (0, 0), (0, padded_dim - dim))
    q_p, k_p, v_p = (jnp.pad(x, pad) for x in (q, k, v))
    if relative == "none":
        window_table = jnp.zeros((2 * padded_genes, padded_dim), q.dtype)
    else:
        window_table = _extended_table(distance_table, padded_genes, max_positions, q.dtype)
        window_table = jnp.pad(window_table, ((0, 0), (0, padded_dim - dim)))
    # HF's additive mask for padding genes; -inf for the block padding, which no query may see
    bias = jnp.where(key_mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    bias = jnp.pad(bias, ((0, 0), (0, padded_genes - genes)), constant_values=_NEG_INF)
    bias = jax.lax.stop_gradient(bias)
    st = _Static(block=block_size, relative=relative, scale=1.0 / math.sqrt(dim), dropout_rate=rate,
                 interpret=bool(interpret))
    mesh = sharding.active_mesh()
    if mesh is None or mesh.size == 1:
        out = _flash(st, seed, q_p, k_p, v_p, window_table, bias)
    else:
        out = _per_shard(st, mesh, seed, q_p, k_p, v_p, window_table, bias)
    return out[:, :genes, :, :dim], None


def _per_shard(st: _Static, mesh, seed, q, k, v, window_table, bias):
    """The kernels on each device's contigs and heads (shard_map over the active mesh).

    A pallas_call has no SPMD partitioning rule: under jit, XLA would gather the whole batch onto
    every device. Each shard hashes its own index into the dropout seed, so shards draw different
    masks (not the masks of an unsharded call)."""
    qkv_spec = sharding.logical_to_spec(("act_batch", None, "act_heads", None))
    bias_spec = sharding.logical_to_spec(("act_batch", None))

    def local(seed, q, k, v, window_table, bias):
        shard = jnp.uint32(0)
        for name in mesh.axis_names:
            shard = shard * jnp.uint32(mesh.shape[name]) + jax.lax.axis_index(name).astype(jnp.uint32)
        return _flash(st, _hash_uint32(seed + shard * jnp.uint32(0x9E3779B1)), q, k, v, window_table, bias)

    replicated = jax.sharding.PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=(replicated, qkv_spec, qkv_spec, qkv_spec, replicated, bias_spec),
                         out_specs=qkv_spec, check_vma=False)(seed, q, k, v, window_table, bias)
