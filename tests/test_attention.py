"""Attention implementations (`glm_jax.kernels`) against the reference and a float64 numpy definition.

Every registered implementation must compute the reference's function: float32 outputs within
1e-5, gradients w.r.t. q, k, v and the distance table within 1e-4 relative, with padding, at
30, 257 (odd) and 1,024 genes. The reference itself is checked against numpy written from the
definition (HF relative_key_query, GLM_SPEC.md section 3), clipping included.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from glm_jax import kernels
from glm_jax.cli import main as cli
from glm_jax.kernels import blockwise
from glm_jax.model import attention as dispatch
from glm_jax.model.glm import GLMConfig, create_model
from helpers import save_original_checkpoint

OUTPUT_TOL = 1e-5
GRAD_RTOL = 1e-4
HEADS, HEAD_DIM = 2, 8


def _available(name):
    try:
        module = kernels.load(name)
    except ImportError:
        return False
    platforms = getattr(module, "PLATFORMS", None)
    return platforms is None or jax.default_backend() in platforms


IMPLEMENTATIONS = [pytest.param(name, marks=pytest.mark.skipif(not _available(name), reason=f"{name} not available"))
                   for name in kernels.IMPLEMENTATIONS]
NON_REFERENCE = [p for p in IMPLEMENTATIONS if p.values[0] != "reference"]


def random_inputs(batch, genes, max_positions, seed=0, lengths=None, dtype=np.float32):
    """q, k, v [batch, genes, heads, d], a distance table and a key mask with padded contigs."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(batch, genes, HEADS, HEAD_DIM)).astype(dtype) for _ in range(3))
    table = rng.normal(size=(2 * max_positions - 1, HEAD_DIM)).astype(dtype)
    lengths = lengths if lengths is not None else [genes] + [max(1, genes - 7 * (i + 1)) for i in range(batch - 1)]
    mask = (np.arange(genes)[None] < np.array(lengths)[:, None]).astype(np.float32)
    return q, k, v, table, mask


def numpy_attention(q, k, v, table, mask, max_positions, clip, relative, keep=None):
    """The definition in float64: D[clamp(i - j)] gathered per pair, HF's finfo(float32).min mask.

    keep: optional [batch, heads, genes, genes] multiplier on the probabilities (dropout)."""
    q, k, v, table = (np.asarray(x, np.float64) for x in (q, k, v, table))
    genes = q.shape[1]
    distance = np.arange(genes)[:, None] - np.arange(genes)[None, :]
    if clip:
        distance = np.clip(distance, -(max_positions - 1), max_positions - 1)
    assert np.abs(distance).max() < max_positions
    rel = table[distance + max_positions - 1]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k)
    if relative != "none":
        scores += np.einsum("bqhd,qkd->bhqk", q, rel)
    if relative == "relative_key_query":
        scores += np.einsum("bkhd,qkd->bhqk", k, rel)
    scores = scores / math.sqrt(q.shape[-1]) + np.where(mask > 0, 0.0, np.finfo(np.float32).min)[:, None, None, :]
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    context = np.einsum("bhqk,bkhd->bqhd", probs if keep is None else probs * keep, v)
    return context, probs


def run(name, q, k, v, table, mask, max_positions, clip=False, relative="relative_key_query", **extra):
    """(context, probs) of one implementation, jitted (one compilation instead of many eager ones)."""
    rng = extra.pop("dropout_rng", None)
    call = functools.partial(kernels.load(name).attention, max_positions=max_positions, clip_distances=clip,
                             relative=relative, **extra)
    return jax.jit(lambda *arrays, rng: call(*arrays, dropout_rng=rng))(
        *(jnp.asarray(x) for x in (q, k, v, table, mask)), rng=rng)


def gradients(name, q, k, v, table, mask, max_positions, clip=False, relative="relative_key_query", **extra):
    """d/d(q, k, v, table) of sum(context * W) for a fixed random W (every output element counts)."""
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape).astype(np.float32))
    module = kernels.load(name)

    def loss(q, k, v, table):
        context, _ = module.attention(q, k, v, table, jnp.asarray(mask), max_positions=max_positions,
                                      clip_distances=clip, relative=relative, **extra)
        return jnp.sum(context.astype(jnp.float32) * weights), context

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*(jnp.asarray(x) for x in (q, k, v, table)))


@functools.lru_cache(maxsize=None)
def reference_gradients(batch, genes, max_positions, seed, lengths=None, clip=False, relative="relative_key_query"):
    """The reference's (gradients, context) on `random_inputs(...)`, computed once per set of inputs."""
    inputs = random_inputs(batch, genes, max_positions, seed=seed, lengths=lengths)
    return gradients("reference", *inputs, max_positions, clip=clip, relative=relative)


def assert_gradients_close(actual, expected, rtol=GRAD_RTOL):
    for name, a, e in zip(("q", "k", "v", "distance_table"), actual, expected):
        scale = float(jnp.abs(e).max())
        error = float(jnp.abs(a.astype(jnp.float32) - e.astype(jnp.float32)).max())
        assert error <= rtol * scale, f"d/d{name}: max error {error:.3g} vs max |grad| {scale:.3g}"


# ---------------------------------------------------------------- the reference against the definition

@pytest.mark.parametrize("relative", kernels.RELATIVE_TYPES)
def test_reference_equals_numpy_definition(relative):
    q, k, v, table, mask = random_inputs(3, 30, 32)
    context, probs = run("reference", q, k, v, table, mask, 32, relative=relative, return_probs=True)
    expected_context, expected_probs = numpy_attention(q, k, v, table, mask, 32, False, relative)
    np.testing.assert_allclose(np.asarray(context), expected_context, atol=OUTPUT_TOL)
    np.testing.assert_allclose(np.asarray(probs), expected_probs, atol=OUTPUT_TOL)
    assert float(np.asarray(probs)[1, :, :, 23:].max()) == 0.0  # padding keys get no weight


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_clipped_distances_equal_numpy_with_a_clamped_index(name):
    """90 genes, a table of 12 distances each way: |i - j| >= 12 reads the table's end rows."""
    q, k, v, table, mask = random_inputs(2, 90, 12, seed=4)
    context, _ = run(name, q, k, v, table, mask, 12, clip=True)
    expected, _ = numpy_attention(q, k, v, table, mask, 12, True, "relative_key_query")
    np.testing.assert_allclose(np.asarray(context), expected, atol=OUTPUT_TOL)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_contig_longer_than_the_table_needs_clipping(name):
    q, k, v, table, mask = random_inputs(1, 20, 12)
    with pytest.raises(kernels.AttentionConfigError, match=r"20 genes exceed max_position_embeddings=12.*clip"):
        run(name, q, k, v, table, mask, 12)


# ---------------------------------------------------------------- every implementation against the reference

@pytest.mark.parametrize("genes", [30, 257, 1024])
@pytest.mark.parametrize("name", NON_REFERENCE)
def test_outputs_and_gradients_equal_reference(name, genes):
    batch, lengths, max_positions = (2, None, max(genes, 40)) if genes < 1024 else (1, (1000,), genes)
    inputs = random_inputs(batch, genes, max_positions, seed=genes, lengths=lengths)
    expected_grads, expected = reference_gradients(batch, genes, max_positions, genes, lengths)
    grads, context = gradients(name, *inputs, max_positions)
    assert context.shape == expected.shape and context.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(context), np.asarray(expected), atol=OUTPUT_TOL, rtol=0)
    assert_gradients_close(grads, expected_grads)


@pytest.mark.parametrize("relative", ["relative_key", "none"])
@pytest.mark.parametrize("name", NON_REFERENCE)
def test_relative_key_and_no_relative_variants(name, relative):
    inputs = random_inputs(2, 45, 50, seed=2)
    expected_grads, expected = reference_gradients(2, 45, 50, 2, relative=relative)
    grads, context = gradients(name, *inputs, 50, relative=relative)
    np.testing.assert_allclose(np.asarray(context), np.asarray(expected), atol=OUTPUT_TOL, rtol=0)
    assert_gradients_close(grads, expected_grads)
    if relative == "none":
        assert float(jnp.abs(grads[3]).max()) == 0.0


@pytest.mark.parametrize("name", NON_REFERENCE)
def test_bfloat16_stays_close_to_float32(name):
    """bf16 q/k/v/table (fp32 softmax): stated tolerance 3e-2 abs on the context (|context| <~ 2)."""
    q, k, v, table, mask = random_inputs(2, 64, 64, seed=3)
    expected, _ = run("reference", q, k, v, table, mask, 64)
    context, _ = run(name, *(x.astype(jnp.bfloat16) for x in (q, k, v, table)), mask, 64)
    assert context.dtype == jnp.bfloat16
    error = float(jnp.abs(context.astype(jnp.float32) - expected).max())
    assert 0 < error < 3e-2


@pytest.mark.parametrize("name", NON_REFERENCE)
def test_bfloat16_gradients_keep_dtypes_and_stay_close(name):
    """Gradients with bf16 q/k/v and a bf16 distance table (the bf16 model casts the table): each
    comes back in its input's dtype (a custom VJP returning a float32 table gradient fails to
    trace) and within bf16 error of the float32 reference's (rel 5e-2 of the largest)."""
    inputs = random_inputs(2, 64, 64, seed=4)
    expected, _ = reference_gradients(2, 64, 64, 4)
    low = [jnp.asarray(x).astype(jnp.bfloat16) for x in inputs[:4]]
    grads, _ = gradients(name, *low, inputs[4], 64)
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    assert_gradients_close(grads, expected, rtol=5e-2)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_probabilities_only_where_materialised(name):
    inputs = random_inputs(1, 10, 16)
    _, probs = run(name, *inputs, 16, return_probs=True)
    assert (probs is not None) == kernels.returns_probs(name)
    if probs is not None:
        assert probs.shape == (1, HEADS, 10, 10) and probs.dtype == jnp.float32


# ---------------------------------------------------------------- blockwise: tiling, padding, clipping, dropout

@pytest.mark.parametrize("block_size", [1, 64, 100])
def test_blockwise_tiles_with_internal_padding_and_clipping(block_size):
    """257 genes cut into blocks that do not divide it, a table shorter than the contig (clipped)
    and a contig entirely padding in its last blocks: equals the float64 definition, gradients the
    reference's."""
    genes = 257 if block_size > 1 else 23
    inputs = random_inputs(2, genes, 40, seed=block_size, lengths=(genes, 37))
    grads, context = gradients("blockwise", *inputs, 40, clip=True, block_size=block_size)
    expected, _ = numpy_attention(*inputs, 40, True, "relative_key_query")
    np.testing.assert_allclose(np.asarray(context), expected, atol=OUTPUT_TOL)
    assert_gradients_close(grads, reference_gradients(2, genes, 40, block_size, (genes, 37), clip=True)[0])


def test_blockwise_bfloat16_blocks_are_stacked_in_place():
    """XLA:CPU rewrites a bf16 dynamic-update-slice inside a loop into a convert of the whole stacked
    buffer per block (quadratic in blocks); blockwise stacks its bf16 context and dq blocks as uint16
    bits, so every update in the compiled forward + backward writes into its buffer in place."""
    q, k, v = (jnp.asarray(np.random.default_rng(i).normal(size=(1, 512, 2, 16)), jnp.bfloat16) for i in range(3))
    table = jnp.asarray(np.random.default_rng(3).normal(size=(1023, 16)), jnp.bfloat16)

    def loss(q, k, v, table):
        context, _ = blockwise.attention(q, k, v, table, jnp.ones((1, 512), jnp.int32), max_positions=512,
                                         clip_distances=False, relative="relative_key_query", block_size=128)
        return context.astype(jnp.float32).sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, k, v, table).compile().as_text()
    updates = [line for line in hlo.split("\n") if "dynamic-update-slice(" in line]
    assert len(updates) >= 2 and not [line for line in updates if "dynamic-update-slice(%convert" in line]


def test_blockwise_dropout_drops_normalised_probabilities():
    """context = (softmax(scores) * keep / (1 - rate)) @ v with the blocks' keep mask, and its gradients
    are those of that dense function (so dropout is recomputed identically in the backward pass)."""
    q, k, v, table, mask = random_inputs(2, 50, 50, seed=6)
    rng, rate = jax.random.PRNGKey(3), 0.25
    keep = blockwise.dense_dropout_mask(rng, 2, HEADS, 50, rate, block_size=16)
    assert 0.6 < float((keep > 0).mean()) < 0.9 and float(keep.max()) == pytest.approx(1 / (1 - rate))
    grads, context = gradients("blockwise", q, k, v, table, mask, 50, dropout_rate=rate, dropout_rng=rng,
                               block_size=16)
    expected, _ = numpy_attention(q, k, v, table, mask, 50, False, "relative_key_query", keep=np.asarray(keep))
    np.testing.assert_allclose(np.asarray(context), expected, atol=OUTPUT_TOL)

    def dense(q, k, v, table):
        from glm_jax.kernels import reference
        probs = reference.attention_probabilities(q, k, table, jnp.asarray(mask), max_positions=50,
                                                  relative="relative_key_query")
        return jnp.einsum("bhqk,bkhd->bqhd", probs * keep, v)

    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape).astype(np.float32))
    expected_grads = jax.jit(jax.grad(lambda *a: jnp.sum(dense(*a) * weights), argnums=(0, 1, 2, 3)))(
        *(jnp.asarray(x) for x in (q, k, v, table)))
    assert_gradients_close(grads, expected_grads)


def test_xla_shifted_dropout_draws_the_reference_masks():
    inputs = random_inputs(2, 30, 32, seed=7)
    rng = jax.random.PRNGKey(5)
    expected, _ = run("reference", *inputs, 32, dropout_rate=0.1, dropout_rng=rng)
    without, _ = run("reference", *inputs, 32)
    context, _ = run("xla_shifted", *inputs, 32, dropout_rate=0.1, dropout_rng=rng)
    np.testing.assert_allclose(np.asarray(context), np.asarray(expected), atol=OUTPUT_TOL)
    assert float(jnp.abs(expected - without).max()) > 1e-2


WITHOUT_DROPOUT = [name for name in kernels.IMPLEMENTATIONS if _available(name) and not kernels.supports_dropout(name)]


@pytest.mark.parametrize("name", WITHOUT_DROPOUT)
def test_dropout_is_refused_where_unsupported(name):
    inputs = random_inputs(1, 10, 16)
    with pytest.raises(kernels.AttentionConfigError, match=rf"{name!r} has no attention dropout.*attention_dropout=0"):
        dispatch.attention(*(jnp.asarray(x) for x in inputs), implementation=name, max_positions=16,
                           clip_distances=False, relative="relative_key_query", dropout_rate=0.1,
                           dropout_rng=jax.random.PRNGKey(0))
    kernels.check_dropout(name, 0.0)  # attention_dropout=0 is the way out
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        GLMConfig(attention="flash")


# ---------------------------------------------------------------- the whole model

TINY = GLMConfig(emb_dim=17, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                 max_position_embeddings=24, num_pc=6, max_genes=24, hidden_dropout=0.0, attention_dropout=0.0)


@functools.lru_cache(maxsize=None)
def model_outputs_and_gradients(attention):
    """Forward outputs and parameter gradients of the tiny gLM (scanned layers) on 40 genes with
    clipped distances (a table of 24), in training mode with dropout rates 0."""
    from flax import nnx

    config = TINY.replace(clip_distances=True, attention=attention)
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.normal(size=(2, 40, config.emb_dim)).astype(np.float32))
    mask = jnp.asarray((np.arange(40)[None] < np.array([[40], [29]])).astype(np.float32))

    @nnx.jit
    def outputs_and_gradients(model):
        def loss(model):
            out = model(inputs, mask, dropout_rng=jax.random.PRNGKey(0))
            return jnp.sum(out.predictions * mask[..., None, None]) + jnp.sum(out.logits), out

        (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return out, grads

    out, grads = outputs_and_gradients(create_model(config, seed=1))
    return out, jax.tree.leaves(nnx.to_pure_dict(grads))


@pytest.mark.parametrize("name", NON_REFERENCE)
def test_model_with_each_implementation_equals_reference(name):
    expected, expected_grads = model_outputs_and_gradients("reference")
    out, grads = model_outputs_and_gradients(name)
    for field in ("last_hidden_state", "predictions", "logits"):
        np.testing.assert_allclose(np.asarray(getattr(out, field)), np.asarray(getattr(expected, field)),
                                   atol=1e-4, rtol=0, err_msg=field)
    for actual, reference in zip(grads, expected_grads):
        assert float(jnp.abs(actual - reference).max()) <= GRAD_RTOL * float(jnp.abs(reference).max()) + 1e-7


def test_attentions_are_none_without_probabilities():
    model = create_model(TINY.replace(attention="blockwise"))
    out = model(jnp.zeros((1, 5, TINY.emb_dim)), jnp.ones((1, 5)), output_attentions=True, output_hidden_states=True)
    assert out.attentions is None and out.hidden_states.shape == (1, 3, 5, 16)
    with pytest.raises(ValueError, match=r"30 genes exceed max_position_embeddings=24"):
        model(jnp.zeros((1, 30, TINY.emb_dim)), jnp.ones((1, 30)))


# ---------------------------------------------------------------- public interface: converted weights, CLI

LONG = GLMConfig(emb_dim=9, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                 max_position_embeddings=512, num_pc=5, max_genes=30)


@pytest.fixture(scope="module")
def converted_long(tmp_path_factory):
    """A random PyTorch gLM (max_position_embeddings 512), converted through `glm-jax convert-torch`."""
    directory = tmp_path_factory.mktemp("long")
    reference = save_original_checkpoint(LONG, directory, seed=11)
    assert cli.main(["convert-torch", str(directory / "glm.bin"), str(directory / "model"),
                     "--hf-config", str(directory / "config.json")]) == 0
    batches = {}
    rng = np.random.default_rng(2)
    for label, lengths in (("genes30", [30, 14, 25]), ("genes500", [500])):
        genes = max(lengths)
        inputs = rng.normal(size=(len(lengths), genes, LONG.emb_dim)).astype(np.float32)
        mask = (np.arange(genes)[None] < np.array(lengths)[:, None]).astype(np.float32)
        np.savez(directory / f"{label}.npz", inputs_embeds=inputs * mask[..., None], attention_mask=mask)
        with torch.no_grad():
            batches[label] = reference(torch.from_numpy(inputs * mask[..., None]), torch.from_numpy(mask),
                                       False, True)
    return directory, batches


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_forward_cli_with_each_attention_matches_pytorch(name, converted_long, tmp_path, capsys):
    directory, expected = converted_long
    for label in ("genes30", "genes500"):
        output = tmp_path / f"{label}.npz"
        assert cli.main(["forward", "--checkpoint", str(directory / "model"), "--input",
                         str(directory / f"{label}.npz"), "--output", str(output), "--attention", name]) == 0
        out = np.load(output)
        mask = np.load(directory / f"{label}.npz")["attention_mask"] > 0
        for field in ("last_hidden_state", "predictions"):
            np.testing.assert_allclose(out[field][mask], expected[label][field].numpy()[mask], atol=1e-4,
                                       err_msg=f"{label} {field}")
        assert ("attentions" in out.files) == kernels.returns_probs(name)
        if "attentions" in out.files:
            np.testing.assert_allclose(out["attentions"], expected[label]["attentions"].numpy(), atol=1e-5)
    printed = capsys.readouterr().out
    assert ("not written: attentions, contacts" in printed) != kernels.returns_probs(name)


def test_forward_help_lists_the_implementations(capsys):
    assert cli.main(["forward", "--help"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in kernels.IMPLEMENTATIONS) and "--clip-distances" in printed


# ---------------------------------------------------------------- training through the config

@pytest.mark.slow  # covered in CI's default run by faster tests; run with -m slow
def test_training_with_blockwise_follows_the_reference_losses(tmp_path):
    """A sharded (2 x 2 x 2 mesh) 3-step run with attention dropout off: blockwise's loss curve is
    the reference's; with dropout on, fused is refused before anything is written."""
    from glm_jax.train import metrics_log
    from helpers import run, tiny_config

    curves = {}
    for name in ("reference", "blockwise"):
        config = tiny_config(steps=3, mesh=(2, 2, 2))
        config.model.attention, config.model.attention_dropout = name, 0.0
        run(config, tmp_path / name)
        curves[name] = [record["loss"] for record in metrics_log.read_metrics(tmp_path / name, "train")]
    np.testing.assert_allclose(curves["blockwise"], curves["reference"], rtol=1e-5)

    config = tiny_config(steps=3)
    config.model.attention = "fused"
    with pytest.raises(kernels.AttentionConfigError, match=r"'fused' has no attention dropout but attention_dropout=0.1"):
        run(config, tmp_path / "fused")
    assert not (tmp_path / "fused").exists()


def test_infer_options_follow_the_implementation_and_clipping():
    from glm_jax.inference import genome

    genome.InferenceOptions(window=64, attention="pairs", attention_impl="xla_shifted").check(2, 32, clip_distances=True)
    with pytest.raises(genome.InferenceInputError, match=r"window 64 exceeds .* 32 \(--clip-distances"):
        genome.InferenceOptions(window=64).check(2, 32)
    with pytest.raises(genome.InferenceInputError, match=r"--attention pairs needs attention maps.*'blockwise'"):
        genome.InferenceOptions(window=30, attention="pairs", attention_impl="blockwise").check(2, 32)
