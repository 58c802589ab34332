"""The training loop on 8 fake CPU devices: mesh invariance, accumulation, determinism, failures, CLI."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from glm_jax.cli import main as cli
from glm_jax.data import shards
from glm_jax.train import metrics_log
from glm_jax.train import trainer as train
from glm_jax.model.glm import config_from_dict_like, create_model
from glm_jax.train.checkpoint import load_model_from_workdir
from helpers import fails, params_numpy, random_windows, readers, run, tiny_config

# Different meshes reduce in different orders (float32 all-reduces), nothing else differs:
# per-step losses agree to ~1e-7 relative; 1e-5 leaves room for 6 Adam steps of amplification.
MESH_RTOL = 1e-5


def assert_close_to_scale(actual, desired, tolerance=1e-5):
    """Equal up to float32 summation order: |difference| <= tolerance x the tensor's largest entry."""
    np.testing.assert_allclose(actual, desired, rtol=0, atol=tolerance * float(np.abs(desired).max()))


def losses(workdir) -> list[float]:
    return [r["loss"] for r in metrics_log.read_metrics(workdir, "train")]


def losses_of(config, workdir) -> list[float]:
    run(config, workdir)
    return losses(workdir)


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    """The same tiny run (6 steps, dropout on) on 1 device and three 8-device meshes."""
    results = {}
    for mesh in ((1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)):
        workdir = tmp_path_factory.mktemp("mesh_" + "x".join(map(str, mesh)))
        results[mesh] = (run(tiny_config(mesh=mesh), workdir), losses(workdir))
    return results


def test_eight_fake_devices():
    assert jax.device_count() == 8, "tests/conftest.py sets XLA_FLAGS before jax starts"


def test_same_loss_curve_on_every_mesh(mesh_runs):
    reference_result, reference = mesh_runs[(1, 1, 1)]
    assert len(reference) == 6
    for mesh, (result, curve) in mesh_runs.items():
        np.testing.assert_allclose(curve, reference, rtol=MESH_RTOL, err_msg=str(mesh))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(mesh)),
                     params_numpy(result), params_numpy(reference_result))


def test_params_live_on_the_mesh(mesh_runs):
    result, _ = mesh_runs[(2, 2, 2)]
    kernel = result.state.params["encoder"]["mlp_in_kernel"]       # [layers, embed, mlp] -> (None, fsdp, tensor)
    assert kernel.shape == (2, 32, 64)
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 16, 32)}
    mu = result.state.opt_state[0].mu["encoder"]["mlp_in_kernel"]  # Adam moments sharded like their params
    assert mu.sharding == kernel.sharding


def test_deterministic_given_seed_and_mesh(mesh_runs, tmp_path):
    _, first = mesh_runs[(8, 1, 1)]
    assert losses_of(tiny_config(mesh=(8, 1, 1)), tmp_path / "again") == first  # bitwise


def test_accumulation_equals_one_larger_batch(tmp_path):
    """4 microbatches of 4 contigs under lax.scan == one batch of 16 (dropout off: it draws
    different random numbers for different shapes; masks are drawn for the whole batch)."""
    results = {}
    for k in (1, 4):
        config = tiny_config(steps=3, mesh=(2, 2, 2), accumulation_steps=k)
        config.model.hidden_dropout = config.model.attention_dropout = 0.0
        results[k] = (run(config, tmp_path / f"k{k}"), losses(tmp_path / f"k{k}"))
    np.testing.assert_allclose(results[4][1], results[1][1], rtol=1e-6)
    jax.tree.map(assert_close_to_scale, params_numpy(results[4][0]), params_numpy(results[1][0]))


@pytest.mark.slow  # covered in CI's default run by faster tests; run with -m slow
def test_masked_genes_reduction_accumulates_exactly():
    """With the "masked_genes" mean, microbatches are weighted by their masked-gene counts."""
    config = tiny_config()
    batch = random_windows(8, config.model.emb_dim, config.model.num_pc)
    obj = train.ObjectiveConfig(reduction="masked_genes")
    model = create_model(config_from_dict_like(config.model).replace(hidden_dropout=0.0, attention_dropout=0.0))
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    masked = np.zeros((8, 30), bool)
    masked[0, :3] = masked[5, :9] = True   # uneven counts per microbatch
    grads = {k: train.accumulated_gradients(params, graphdef, batch, masked, None, obj, k) for k in (1, 2, 4)}
    for k in (2, 4):
        np.testing.assert_allclose(grads[k][1]["loss"], grads[1][1]["loss"], rtol=1e-6)
        jax.tree.map(assert_close_to_scale, grads[k][0], grads[1][0])


def test_nan_fails_loudly_naming_the_step(tmp_path):
    """NaN data is refused before training when the first batch has it (naming the rows), and stops
    the run naming the step when it appears later (only the first batch is validated on the host)."""
    config = tiny_config(steps=4, mesh=(8, 1, 1))
    train_reader, _ = readers(config)
    train_reader.arrays["inputs_embeds"][:] = np.nan
    with pytest.raises(ValueError, match=r"first train batch .*inputs_embeds contain NaN/Inf at \[contig, gene\] \[\[0, 0\]"):
        train.train_and_evaluate(config, tmp_path / "first", train_data=train_reader)

    class NanAfterTheFirstBatch(shards.InMemoryWindows):
        def __next__(self):  # by position: the trainer reads the first batch twice (checked, rewound, trained on)
            first = self.state()["consumed"] == 0
            batch = super().__next__()
            return batch if first else dict(batch, inputs_embeds=np.full_like(batch["inputs_embeds"], np.nan))

    m = config.model
    later = NanAfterTheFirstBatch(random_windows(96, m.emb_dim, m.num_pc), config.train.batch_size, seed=config.train.seed)
    with pytest.raises(FloatingPointError, match="at step 2 "):
        train.train_and_evaluate(config, tmp_path / "later", train_data=later)


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 12}, "must be divisible by data x fsdp = 8"),
    ({"accumulation_steps": 4}, "train.accumulation_steps = 4"),
])
def test_batch_that_does_not_split_is_refused(tmp_path, change, message):
    config = tiny_config(**change)
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, tmp_path, train_data=readers(config)[0])


def test_float16_training_is_refused(tmp_path):
    config = tiny_config()
    config.model.compute_dtype = "float16"
    with pytest.raises(ValueError, match="loss scaling"):
        train.train_and_evaluate(config, tmp_path, train_data=readers(config)[0])


def test_data_that_does_not_fit_the_model_is_refused(tmp_path):
    config = tiny_config()
    config.model.emb_dim = 65
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, genes, 65\] for this model \(emb_dim 65\), got \[16, 30, 33\]"):
        train.train_and_evaluate(config, tmp_path, train_data=readers(tiny_config())[0])


@pytest.mark.parametrize("wrong_split", ["train", "eval"])
def test_cli_refuses_windows_of_another_width_before_writing_the_workdir(tmp_path, capsys, wrong_split):
    """A width mismatch in either split is one line naming the file, and no workdir is left
    (before, the train split was checked after glm_config.json was written, the eval split never)."""
    config = tiny_config()
    for split, seed in (("train", 0), ("eval", 1)):
        emb_dim = config.model.emb_dim + (7 if split == wrong_split else 0)
        np.savez(tmp_path / f"{split}.npz", **random_windows(64, emb_dim, config.model.num_pc, seed))
    workdir = tmp_path / "run"
    line = fails(capsys, "train", "--config", "configs/tiny.py", "--workdir", workdir,
                 f"--config.data.train_pattern={tmp_path / 'train.npz'}",
                 f"--config.data.eval_pattern={tmp_path / 'eval.npz'}")
    assert f"first {wrong_split} batch of {tmp_path / (wrong_split + '.npz')}" in line and "emb_dim 33" in line
    assert not workdir.exists()


def test_cli_trains_from_npz_logs_eval_and_leaves_a_loadable_model(tmp_path):
    """`glm-jax train` with overrides on .npz windows; eval metrics logged; the workdir loads as a model."""
    config = tiny_config()
    for split, seed in (("train", 0), ("eval", 1)):
        np.savez(tmp_path / f"{split}.npz", **random_windows(64, config.model.emb_dim, config.model.num_pc, seed))
    workdir = tmp_path / "run"
    argv = ["--config", "configs/tiny.py", "--workdir", str(workdir),
            f"--config.data.train_pattern={tmp_path / 'train.npz'}", f"--config.data.eval_pattern={tmp_path / 'eval.npz'}",
            "--config.train.num_steps=8", "--config.train.eval_every=4", "--config.train.checkpoint_every=4"]
    assert cli.main(["train"] + argv) == 0
    evals = metrics_log.read_metrics(workdir, "eval")
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["masked_genes"] > 0 and sum(evals[-1]["confidence_histogram"]) == evals[-1]["masked_genes"]
    assert {"pseudo_accuracy", "absolute_accuracy", "mean_confidence"} <= set(evals[-1])
    train_records = metrics_log.read_metrics(workdir, "train")
    assert train_records[-1]["step"] == 8 and train_records[-1]["genes_per_s"] > 0
    assert json.loads((workdir / "glm_config.json").read_text())["hidden_size"] == 32
    model = load_model_from_workdir(workdir)
    assert model.config.hidden_size == 32
    assert (workdir / "tensorboard").is_dir()
