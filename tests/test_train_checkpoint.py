"""Training checkpoints: resume on another mesh, SIGKILL or SIGTERM + resume == uninterrupted, errors."""
import pathlib
import signal
import time

import jax
import numpy as np
import pytest

from glm_jax.train import metrics_log
from glm_jax.train import trainer as train
from glm_jax.train.checkpoint import CheckpointMismatchError, TrainCheckpointer, load_model_from_workdir
from glm_jax.model.checkpoint import params_as_dict
from glm_jax.model.glm import config_from_dict_like
from helpers import params_numpy, run, start_script, tiny_config

TIME_KEYS = ("time", "step_time_s", "steps_per_s", "genes_per_s", "contigs_per_s", "tflops_per_s_per_device")


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]


def start_run(workdir, steps, delay, checkpoint_every=2, cache=None):
    """`tests/scripts/train_run.py` in a new process (8 fake devices through the inherited XLA_FLAGS)."""
    return start_script("train_run.py", workdir, steps, delay, checkpoint_every, cache=cache)


def wait_for(condition, process, timeout=600):  # generous: compiling is slow on a busy machine
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"run ended early:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def checkpoint_steps(workdir) -> list[int]:
    directory = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 8-step run on (8, 1, 1), checkpoints every 2 steps, keeping 3."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, run(tiny_config(steps=8), workdir)


def test_checkpoint_of_8x1x1_resumes_on_2x2x2(reference, tmp_path):
    ref_dir, ref_result = reference
    run(tiny_config(steps=4, mesh=(8, 1, 1)), tmp_path)
    resumed = run(tiny_config(steps=8, mesh=(2, 2, 2)), tmp_path)
    kernel = resumed.state.params["encoder"]["query_kernel"]
    assert dict(kernel.sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    curve = [r["loss"] for r in metrics_log.read_metrics(tmp_path, "train")]
    expected = [r["loss"] for r in metrics_log.read_metrics(ref_dir, "train")]
    np.testing.assert_allclose(curve, expected, rtol=1e-5)  # same tolerance as the mesh test
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params_numpy(resumed), params_numpy(ref_result))


def test_keeps_the_newest_checkpoints(reference):
    assert checkpoint_steps(reference[0]) == [4, 6, 8]


def test_sigkill_then_resume_equals_the_uninterrupted_run(reference, tmp_path):
    ref_dir, ref_result = reference
    workdir = tmp_path / "run"
    killed = start_run(workdir, 8, delay=0.4, cache=tmp_path / "cache")
    wait_for(lambda: len(checkpoint_steps(workdir)) > 0 and max(checkpoint_steps(workdir)) >= 4, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    interrupted_at = max(checkpoint_steps(workdir))
    assert interrupted_at < 8
    resumed = start_run(workdir, 8, delay=0.0, cache=tmp_path / "cache")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and "finished at step 8" in output, output
    # bitwise: same program, same data position, same step-folded randomness
    jax.tree.map(np.testing.assert_array_equal, params_as_dict(load_model_from_workdir(workdir)),
                 params_numpy(ref_result))
    assert without_timing(metrics_log.read_metrics(workdir)) == without_timing(metrics_log.read_metrics(ref_dir))


def test_sigterm_checkpoint_then_resume_equals_the_uninterrupted_run(reference, tmp_path):
    """SIGTERM mid-run: a checkpoint at the step reached, exit 0; the rerun resumes there and ends
    bit-identical to the uninterrupted run (no periodic checkpoints: only the SIGTERM one)."""
    ref_dir, ref_result = reference
    workdir = tmp_path / "run"
    process = start_run(workdir, 8, delay=0.5, checkpoint_every=1000, cache=tmp_path / "cache")
    wait_for(lambda: any(r["step"] >= 3 for r in metrics_log.read_metrics(workdir, "train")), process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    (step,) = checkpoint_steps(workdir)
    assert 3 <= step < 8 and f"saved a checkpoint at step {step}" in output and "preempted=True" in output
    resumed = start_run(workdir, 8, delay=0.0, checkpoint_every=1000, cache=tmp_path / "cache")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and "finished at step 8" in output, output
    assert f"resuming at step {step}" in output
    jax.tree.map(np.testing.assert_array_equal, params_as_dict(load_model_from_workdir(workdir)),
                 params_numpy(ref_result))
    assert without_timing(metrics_log.read_metrics(workdir, "train")) == without_timing(
        metrics_log.read_metrics(ref_dir, "train"))


def test_another_architecture_in_the_workdir_is_refused(reference, tmp_path):
    ref_dir, _ = reference
    config = tiny_config(steps=8)
    config.model.hidden_size = 64
    with pytest.raises(CheckpointMismatchError, match="hidden_size: saved 32 vs config 64"):
        train.train_and_evaluate(config, ref_dir)
    # without glm_config.json, the checkpoint's own metadata catches it
    checkpointer = TrainCheckpointer(ref_dir, keep=3)
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint .*/8 holds a model of another architecture"):
        checkpointer.check_compatible(8, config_from_dict_like(config.model), {})
    checkpointer.close()


def test_load_model_from_workdir_picks_the_step(reference):
    ref_dir, ref_result = reference
    jax.tree.map(np.testing.assert_array_equal, params_as_dict(load_model_from_workdir(ref_dir)),
                 params_numpy(ref_result))
    older = params_as_dict(load_model_from_workdir(ref_dir, step=4))
    assert not np.array_equal(older["input_kernel"], params_numpy(ref_result)["input_kernel"])
    with pytest.raises(FileNotFoundError, match="no training checkpoint 2"):
        load_model_from_workdir(ref_dir, step=2)
