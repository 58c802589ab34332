"""Attention implementations for gLM's relative-position attention, behind one contract.

Every module named in `IMPLEMENTATIONS` exports

    attention(q, k, v, distance_table, key_mask, *, max_positions, clip_distances, relative,
              dropout_rate=0.0, dropout_rng=None, return_probs=False) -> (context, probs | None)

computing (HF RoBERTa `relative_key_query`, GLM_SPEC.md section 3)

    scores[b, h, i, j] = (q_i.k_j + q_i.D[i-j] + k_j.D[i-j]) / sqrt(head_dim) + bias[b, j]
    bias = 0 for genes, finfo(float32).min for padding keys
    context = dropout(softmax_j(scores)) @ v        (softmax in float32)

with q, k, v: [batch, genes, heads, head_dim]; distance_table: [2 * max_positions - 1, head_dim]
(row i - j + max_positions - 1 holds D[i - j]); key_mask: [batch, genes] (1 gene, 0 padding).
`relative="relative_key"` drops the k.D term, `"none"` both relative terms. With
`clip_distances`, |i - j| > max_positions - 1 uses the table's end rows (Shaw et al. 2018);
without it a contig longer than max_positions is an error.

Modules also state `RETURNS_PROBS` (materialises the [batch, heads, genes, genes] probabilities)
and `SUPPORTS_DROPOUT` (attention-probability dropout). Modules are imported on first use, so an
implementation whose platform is missing (Pallas/Triton) costs nothing until it is picked.
"""
from __future__ import annotations

import importlib
import types

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = {
    "reference": "glm_jax.kernels.reference",      # HF-exact: gathers D[i-j] into [S, S, d]
    "xla_shifted": "glm_jax.kernels.xla_shifted",  # q.D^T, k.D^T as [S, 2S-1], skewed into [S, S]
    "blockwise": "glm_jax.kernels.blockwise",      # query blocks x all keys, O(B x H x S x block) memory
    "fused": "glm_jax.kernels.fused",              # jax.nn.dot_product_attention with a relative bias
    "pallas": "glm_jax.kernels.pallas_flash",      # Pallas flash-attention kernel
}
RELATIVE_TYPES = ("relative_key_query", "relative_key", "none")


class AttentionConfigError(ValueError):
    """An attention implementation asked to do what it cannot (unknown name, dropout, length)."""


def dot_product_implementation(dtype) -> str:
    """`implementation=` of `jax.nn.dot_product_attention` for inputs of `dtype`: cuDNN's fused
    kernel on NVIDIA GPUs for bfloat16/float16 (the only dtypes it takes), XLA's elsewhere."""
    return "cudnn" if jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16) else "xla"


def check_name(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise AttentionConfigError(f"unknown attention implementation {name!r}; "
                                   f"choose one of {tuple(IMPLEMENTATIONS)}")
    return name


def load(name: str) -> types.ModuleType:
    """The implementation module registered as `name`."""
    return importlib.import_module(IMPLEMENTATIONS[check_name(name)])


def supports_dropout(name: str) -> bool:
    return bool(getattr(load(name), "SUPPORTS_DROPOUT", False))


def returns_probs(name: str) -> bool:
    return bool(getattr(load(name), "RETURNS_PROBS", False))


def check_dropout(name: str, attention_dropout: float) -> None:
    """Refuses training with attention dropout on an implementation that cannot drop probabilities."""
    if attention_dropout > 0 and not supports_dropout(name):
        usable = [n for n in IMPLEMENTATIONS if n != name and _importable(n) and supports_dropout(n)]
        raise AttentionConfigError(
            f"attention implementation {name!r} has no attention dropout but attention_dropout="
            f"{attention_dropout}: set --config.model.attention_dropout=0 (a change from the original's "
            f"training) or use one of {usable}")


def _importable(name: str) -> bool:
    try:
        load(name)
    except ImportError:
        return False
    return True


def check_length(num_genes: int, max_positions: int, clip_distances: bool) -> None:
    """A contig longer than the distance table is an error unless distances are clipped."""
    if num_genes > max_positions and not clip_distances:
        raise AttentionConfigError(
            f"{num_genes} genes exceed max_position_embeddings={max_positions}: distances would fall off "
            f"the table (clip_distances=True maps them to its end rows)")


def distance_rows(distances: jax.Array, max_positions: int) -> jax.Array:
    """Table row of each distance i - j, clamped to +-(max_positions - 1).

    The clamp is what clip_distances means; without clipping, `check_length` guarantees the
    distances are already in range, so the clamp changes nothing.
    """
    limit = max_positions - 1
    return jnp.clip(distances, -limit, limit) + limit


def distance_window(distance_table: jax.Array, first_distance, count: int, max_positions: int,
                    descending: bool = False) -> jax.Array:
    """Rows D[first_distance], D[first_distance + 1], ... (`count` of them; reversed if descending).

    distance_table: [2 * max_positions - 1, head_dim] -> [count, head_dim]. `first_distance` may be
    traced (a block offset); distances beyond the table are clamped (clip_distances).
    """
    offsets = jnp.arange(count)
    distances = first_distance + (count - 1 - offsets if descending else offsets)
    return jnp.take(distance_table, distance_rows(distances, max_positions), axis=0)


def skew(x: jax.Array, num_columns: int) -> jax.Array:
    """y[..., a, b] = x[..., a, R - 1 - a + b]: the Transformer-XL "relative shift" by reshapes.

    x: [..., R, R + num_columns - 1] -> [..., R, num_columns]. Row a of x holds scores against
    consecutive distances; row a of y reads the window of them that its columns need. In flat
    memory element (a, R - 1 - a + b) sits at a * (R + num_columns - 2) + (R - 1) + b, so dropping
    R - 1 leading elements and re-reading rows of R + num_columns - 2 gives y in its first columns.
    """
    rows, width = x.shape[-2], x.shape[-1]
    if width != rows + num_columns - 1:
        raise ValueError(f"skew needs {rows + num_columns - 1} columns for {rows} rows, got {width}")
    if rows == 1:
        return x[..., :num_columns]
    lead = x.shape[:-2]
    stride = width - 1
    flat = x.reshape(*lead, rows * width)[..., rows - 1: rows - 1 + rows * stride]
    return flat.reshape(*lead, rows, stride)[..., :num_columns]


def relative_scores(q: jax.Array, k: jax.Array, distance_table: jax.Array, first_query: int | jax.Array,
                    first_key: int | jax.Array, max_positions: int, relative: str) -> jax.Array:
    """q_i.D[i-j] (+ k_j.D[i-j] for relative_key_query) for a block of queries and keys, float32.

    q: [batch, queries, heads, d] starting at gene `first_query`; k: [batch, keys, heads, d] starting
    at `first_key` -> [batch, heads, queries, keys]. Uses only the queries + keys - 1 distance rows
    the block spans, via `skew`; never builds a [queries, keys, d] tensor.
    """
    nq, nk = q.shape[1], k.shape[1]
    # Query row i needs distances offset + i - j for j = 0..nk-1: the descending window read from
    # its row i on. Row m of the window holds D[offset + nq - 1 - m].
    offset = first_query - first_key
    rows_desc = distance_window(distance_table, offset - (nk - 1), nq + nk - 1, max_positions, descending=True)
    scores = skew(jnp.einsum("bqhd,md->bhqm", q, rows_desc.astype(q.dtype), preferred_element_type=jnp.float32), nk)
    if relative == "relative_key_query":
        # Key row j needs distances offset + i - j for i = 0..nq-1: the ascending window from row nk-1-j.
        rows_asc = rows_desc[::-1].astype(k.dtype)
        key_part = jnp.einsum("bkhd,md->bhkm", k, rows_asc, preferred_element_type=jnp.float32)
        scores = scores + skew(key_part, nq).swapaxes(-1, -2)
    return scores


def key_bias(key_mask: jax.Array) -> jax.Array:
    """Additive key mask as HF builds it: [batch, genes] (1 gene, 0 pad) -> [batch, 1, 1, genes]
    float32, 0 for genes and finfo(float32).min for padding."""
    mask = key_mask.astype(jnp.float32)[:, None, None, :]
    return (1.0 - mask) * jnp.finfo(jnp.float32).min
