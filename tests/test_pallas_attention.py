"""The Pallas flash kernel (interpret mode on CPU) against the materialising attention.

Reference: the registry's `reference` (HF's relative_key_query scores, full [S, S] softmax)
followed by probs @ v, and for clipped distances a jnp version written from the definition.
Outputs within 1e-5 and gradients w.r.t. q, k, v and the distance table within 1e-4 (relative to
the largest entry), with padded genes, at S = 30, an odd length and 1,024.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from glm_jax import kernels
from glm_jax.kernels import pallas_flash, reference
from glm_jax.model import glm


def _inputs(batch, genes, heads, head_dim, max_positions, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v = (jax.random.normal(key, (batch, genes, heads, head_dim), dtype) for key in keys[:3])
    table = 0.5 * jax.random.normal(keys[3], (2 * max_positions - 1, head_dim))
    key_mask = np.ones((batch, genes), np.float32)
    key_mask[-1, genes - genes // 3:] = 0  # the last contig is a third padding
    cotangent = jax.random.normal(keys[4], (batch, genes, heads, head_dim))
    return q, k, v, table, jnp.asarray(key_mask), cotangent


def _reference(q, k, v, table, key_mask, max_positions, relative):
    """HF relative_key_query attention, materialised probabilities."""
    return reference.attention(q, k, v, table, key_mask, max_positions=max_positions, clip_distances=False,
                               relative=relative)[0]


def _clipped_reference(q, k, v, table, key_mask, max_positions):
    """From the definition: D[clip(i - j, -(P-1), P-1)], scores, masked softmax, @ v."""
    genes, head_dim = q.shape[1], q.shape[3]
    distance = jnp.arange(genes)[:, None] - jnp.arange(genes)[None, :]
    rel = table[jnp.clip(distance, -(max_positions - 1), max_positions - 1) + max_positions - 1]  # [i, j, d]
    scores = (jnp.einsum("bihd,bjhd->bhij", q, k) + jnp.einsum("bihd,ijd->bhij", q, rel)
              + jnp.einsum("bjhd,ijd->bhij", k, rel)) / math.sqrt(head_dim)
    scores = jnp.where(key_mask[:, None, None, :] > 0, scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(scores, axis=-1), v)


def _value_and_grads(fn, q, k, v, table, cotangent):
    """fn's output and the gradients of <fn(q, k, v, table), cotangent> w.r.t. all four."""
    out, vjp = jax.vjp(fn, q, k, v, table)
    return out, vjp(cotangent)


def _assert_close(kernel, reference, atol_out=1e-5, rtol_grad=1e-4):
    (out, grads), (ref_out, ref_grads) = kernel, reference
    np.testing.assert_allclose(out, ref_out, atol=atol_out, rtol=0)
    for name, got, want in zip(("q", "k", "v", "distance_table"), grads, ref_grads):
        scale = float(jnp.abs(want).max())
        assert scale > 0, name
        err = float(jnp.abs(got - want).max()) / scale
        assert err <= rtol_grad, f"d{name}: relative error {err:.2e}"


@pytest.mark.parametrize("genes,heads,head_dim,block", [
    (30, 2, 8, 16), (257, 2, 16, 32), pytest.param(1024, 1, 16, 64, marks=pytest.mark.slow)])
def test_matches_reference_with_padding(genes, heads, head_dim, block):
    # head_dim 8 also exercises the zero-padding of head_dim to 16
    batch = 2 if genes < 1024 else 1
    q, k, v, table, key_mask, cotangent = _inputs(batch, genes, heads, head_dim, max_positions=genes)
    if genes == 30:
        # a contig of only padding: HF's finite mask makes its rows uniform over the real length
        q, k, v, cotangent = (jnp.concatenate([x, x[:1]]) for x in (q, k, v, cotangent))
        key_mask = jnp.concatenate([key_mask, jnp.zeros((1, genes))])

    def kernel(q, k, v, table):
        return pallas_flash.attention(q, k, v, table, key_mask, max_positions=genes, clip_distances=False,
                                      relative="relative_key_query", block_size=block)[0]

    expected = lambda q, k, v, table: _reference(q, k, v, table, key_mask, genes, "relative_key_query")
    _assert_close(jax.jit(lambda *a: _value_and_grads(kernel, *a, cotangent))(q, k, v, table),
                  _value_and_grads(expected, q, k, v, table, cotangent))


@pytest.mark.slow
def test_relative_key_only_matches_reference():
    q, k, v, table, key_mask, cotangent = _inputs(2, 45, 2, 16, max_positions=64)
    kernel = lambda *a: pallas_flash.attention(*a, key_mask, max_positions=64, clip_distances=False,
                                               relative="relative_key", block_size=16)[0]
    expected = lambda *a: _reference(*a, key_mask, 64, "relative_key")
    _assert_close(_value_and_grads(kernel, q, k, v, table, cotangent),
                  _value_and_grads(expected, q, k, v, table, cotangent))


def test_no_relative_terms_matches_softmax_attention():
    q, k, v, table, key_mask, cotangent = _inputs(2, 40, 2, 16, max_positions=40)
    out = pallas_flash.attention(q, k, v, table, key_mask, max_positions=40, clip_distances=False,
                                 relative="none", block_size=16)[0]
    np.testing.assert_allclose(out, _reference(q, k, v, table, key_mask, 40, "none"), atol=1e-5, rtol=0)


def test_clipped_distances_match_definition():
    # 70 genes, a table for distances -7..7: most pairs use the table's end rows
    max_positions = 8
    q, k, v, table, key_mask, cotangent = _inputs(2, 70, 2, 16, max_positions=max_positions, seed=3)
    kernel = lambda *a: pallas_flash.attention(*a, key_mask, max_positions=max_positions, clip_distances=True,
                                               relative="relative_key_query", block_size=32)[0]
    expected = lambda *a: _clipped_reference(*a, key_mask, max_positions)
    _assert_close(_value_and_grads(kernel, q, k, v, table, cotangent),
                  _value_and_grads(expected, q, k, v, table, cotangent))


def test_registered_and_longer_than_table_without_clipping_is_an_error():
    assert kernels.load("pallas") is pallas_flash
    q, k, v, table, key_mask, _ = _inputs(1, 20, 1, 16, max_positions=8)
    with pytest.raises(kernels.AttentionConfigError, match="exceed max_position_embeddings=8"):
        pallas_flash.attention(q, k, v, table, key_mask, max_positions=8, clip_distances=False,
                               relative="relative_key_query")


def test_dropout_applies_the_documented_mask_forward_and_backward():
    genes, heads, rate = 40, 2, 0.25
    q, k, v, table, key_mask, cotangent = _inputs(2, genes, heads, 16, max_positions=genes)
    rng = jax.random.PRNGKey(7)
    kernel = lambda *a: pallas_flash.attention(*a, key_mask, max_positions=genes, clip_distances=False,
                                               relative="relative_key_query", dropout_rate=rate,
                                               dropout_rng=rng, block_size=16)[0]
    seed = jax.random.bits(rng, (1,), jnp.uint32)[0]
    keep = pallas_flash.dropout_keep_mask(seed, 2, heads, genes, rate)

    def dropped_reference(q, k, v, table):
        probs = reference.attention_probabilities(q, k, table, key_mask, max_positions=genes,
                                                  relative="relative_key_query")
        return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(keep, probs / (1 - rate), 0.0), v)

    _assert_close(_value_and_grads(kernel, q, k, v, table, cotangent),
                  _value_and_grads(dropped_reference, q, k, v, table, cotangent))


def test_dropout_mask_keeps_the_expected_fraction_independently():
    keep_a = np.asarray(pallas_flash.dropout_keep_mask(jnp.uint32(1), 2, 4, 256, 0.1))
    keep_b = np.asarray(pallas_flash.dropout_keep_mask(jnp.uint32(2), 2, 4, 256, 0.1))
    # 524,288 Bernoulli(0.9) draws: the standard error of the mean is 4e-4
    assert abs(keep_a.mean() - 0.9) < 3e-3
    # a different seed, batch row or head gives a different mask (agreement ~ 0.9^2 + 0.1^2 = 0.82)
    assert abs((keep_a == keep_b).mean() - 0.82) < 5e-3
    assert abs((keep_a[0] == keep_a[1]).mean() - 0.82) < 5e-3
    assert abs((keep_a[:, 0] == keep_a[:, 1]).mean() - 0.82) < 5e-3


@pytest.mark.slow
def test_bfloat16_stays_near_the_float32_reference():
    q, k, v, table, key_mask, _ = _inputs(2, 50, 2, 16, max_positions=50)
    out = pallas_flash.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), table, key_mask, max_positions=50,
                                 clip_distances=False, relative="relative_key_query", block_size=16)[0]
    assert out.dtype == jnp.bfloat16
    expected = _reference(q, k, v, table, key_mask, 50, "relative_key_query")
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=5e-2, rtol=0)


def test_glm_with_pallas_attention_matches_reference_attention():
    """The model through the registry: config.attention = "pallas" vs "reference", same weights."""
    from flax import nnx

    config = glm.GLMConfig(emb_dim=17, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                           max_position_embeddings=40, max_genes=40, num_pc=6)
    model = glm.create_model(config)
    inputs = jax.random.normal(jax.random.PRNGKey(1), (2, 40, 17))
    mask = jnp.ones((2, 40)).at[1, 25:].set(0)
    expected = model(inputs, mask).last_hidden_state
    pallas_model = glm.create_model(config.replace(attention="pallas"))
    nnx.update(pallas_model, nnx.state(model))
    np.testing.assert_allclose(pallas_model(inputs, mask).last_hidden_state, expected, atol=1e-5, rtol=0)


def test_sharded_batch_and_heads_run_per_device():
    """Under a (data 2, fsdp 1, tensor 2) mesh the kernels run per shard (shard_map): same output
    and gradients as the reference, and XLA gathers nothing."""
    from glm_jax import sharding

    q, k, v, table, key_mask, cotangent = _inputs(4, 30, 2, 16, max_positions=30)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 1, 2), sharding.MESH_AXES)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor"))
    q, k, v, cotangent = (jax.device_put(x, spec) for x in (q, k, v, cotangent))

    def kernel(q, k, v, table):
        return pallas_flash.attention(q, k, v, table, key_mask, max_positions=30, clip_distances=False,
                                      relative="relative_key_query", block_size=16)[0]

    with sharding.use_mesh(mesh):
        step = jax.jit(lambda *a: _value_and_grads(kernel, *a, cotangent))
        hlo = step.lower(q, k, v, table).compile().as_text()
        got = step(q, k, v, table)
    assert "all-gather" not in hlo
    expected = lambda *a: _reference(*a, key_mask, 30, "relative_key_query")
    _assert_close(got, _value_and_grads(expected, q, k, v, table, cotangent))


def _abstract_gpu():
    """jax 0.11 (the GPU machine's) has Pallas's Triton lowering ask which GPU it targets; without
    one, an abstract H100 names it (jax 0.10 asks nothing and accepts the same context)."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("devices",), abstract_device=device))


def test_kernels_lower_to_triton():
    """Lowers forward + backward for CUDA without a GPU: every kernel must pass Pallas's Triton
    lowering (2-D dots, power-of-two shapes, supported primitives). Compiling and running on a GPU
    is not covered here."""
    shapes = [jax.ShapeDtypeStruct((1, 64, 2, 128), jnp.bfloat16)] * 3
    table = jax.ShapeDtypeStruct((2 * 64 - 1, 128), jnp.float32)
    key_mask = jax.ShapeDtypeStruct((1, 64), jnp.float32)

    def loss(q, k, v, table, key_mask):
        out = pallas_flash.attention(q, k, v, table, key_mask, max_positions=64, clip_distances=False,
                                     relative="relative_key_query", dropout_rate=0.1,
                                     dropout_rng=jax.random.PRNGKey(0), interpret=False)[0]
        return out.astype(jnp.float32).sum()

    with _abstract_gpu():
        exported = export.export(
            jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*shapes, table, key_mask)
    names = ("glm_flash_forward", "glm_flash_dq", "glm_flash_dkdv", "glm_flash_dwindow")
    text = exported.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 4
    assert all(f'name = "{name}"' in text for name in names)
