"""Faults of training checkpoints: a step left unfinished by a killed process, a corrupted or
truncated newest step (fallback to the previous one), a full disk during a save."""
import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.train import checkpoint as train_checkpoint
from glm_jax.train import metrics_log
from glm_jax.train.checkpoint import CheckpointCorruptError, CheckpointSaveError, TrainCheckpointer
from helpers import REPO_ROOT, TESTS_DIR, params_numpy, random_windows, run, tiny_config


def small_state(step: int, size: int = 3000):
    params = {"w": jnp.asarray(np.random.default_rng(step).normal(size=size).astype(np.float32))}
    return params, {"m": params["w"] * 2}


def save_steps(workdir, steps, keep=5):
    checkpointer = TrainCheckpointer(workdir, keep=keep)
    for step in steps:
        checkpointer.save(step, *small_state(step), {"consumed": step}, {"model": {}})
    checkpointer.close()


def largest_item_file(step_dir: pathlib.Path, item: str = "params") -> pathlib.Path:
    return max((p for p in (step_dir / item).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path: pathlib.Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def flip_a_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# --- a step left unfinished -----------------------------------------------------------------------

KILLED_SAVE = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp, numpy as np
    from glm_jax.train import checkpoint
    workdir = sys.argv[1]
    c = checkpoint.TrainCheckpointer(workdir, keep=5)
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=300_000).astype(np.float32))}
    c.save(1, params, params, {"consumed": 1}, {})
    c.wait()
    def stalled(step_dir):  # every host has written its files; the rename to '2/' has not happened
        print("writing", flush=True)
        time.sleep(600)
    checkpoint.write_digest = stalled
    c.save(2, params, params, {"consumed": 2}, {})
    c.wait()
""")


def test_a_step_left_unfinished_by_a_killed_process_is_never_complete(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{TESTS_DIR}")
    process = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout.readline().strip() == "writing"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    directory = tmp_path / "checkpoints"
    unfinished = [p.name for p in directory.iterdir() if p.name.startswith("2.")]
    assert unfinished and (directory / unfinished[0] / "params").is_dir()  # the killed save's files are there
    assert not (directory / "2").exists()
    checkpointer = TrainCheckpointer(tmp_path, keep=5)
    assert checkpointer.all_steps() == [1] and checkpointer.latest_step() == 1
    checkpointer.save(2, *small_state(2), {"consumed": 2}, {})  # the same step again, after a resume
    checkpointer.close()
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]  # the leftover was cleaned up
    assert TrainCheckpointer(tmp_path, keep=5).latest_step() == 2


# --- a corrupted newest step ------------------------------------------------------------------------

@pytest.mark.parametrize("damage", [truncate, flip_a_byte, lambda path: path.unlink()],
                         ids=["truncated", "overwritten", "deleted"])
def test_corrupt_newest_step_falls_back_with_one_warning(tmp_path, capsys, damage):
    save_steps(tmp_path, [1, 2, 3])
    damage(largest_item_file(tmp_path / "checkpoints" / "3"))
    checkpointer = TrainCheckpointer(tmp_path, keep=5)
    assert checkpointer.latest_step() == 2 and checkpointer.latest_step() == 2
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "warning: corrupt or truncated checkpoint" in warnings[0], warnings
    assert "step 3 (params/" in warnings[0] and "using step 2" in warnings[0]
    assert checkpointer.all_steps() == [1, 2]
    assert [p.name.split("-")[0] for p in (tmp_path / train_checkpoint.CORRUPT_DIR).iterdir()] == ["3"]


def test_read_only_skips_corrupt_steps_without_moving_them(tmp_path, capsys):
    save_steps(tmp_path, [1, 2])
    flip_a_byte(tmp_path / "checkpoints" / "2" / "meta" / "metadata")
    checkpointer = TrainCheckpointer(tmp_path, keep=1, read_only=True)
    assert checkpointer.latest_step(train_checkpoint.INFERENCE_ITEMS) == 1
    assert "step 2 (meta/metadata" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "2").is_dir()
    with pytest.raises(CheckpointCorruptError, match=r"checkpoints/2 is corrupt or truncated: meta/metadata"):
        checkpointer._check_readable(2, None)


def test_every_step_corrupt_is_one_error(tmp_path):
    save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        truncate(largest_item_file(tmp_path / "checkpoints" / str(step), "opt_state"))
    with pytest.raises(CheckpointCorruptError, match=r"every checkpoint in .* is corrupt .*step 2 .*step 1"):
        TrainCheckpointer(tmp_path, keep=5).latest_step()


def test_training_resumes_from_the_step_before_a_corrupt_newest_one(tmp_path, capsys):
    config = tiny_config(steps=4)
    first = run(config, tmp_path)              # checkpoints 2 and 4
    first_losses = [r["loss"] for r in metrics_log.read_metrics(tmp_path, "train")]
    truncate(largest_item_file(tmp_path / "checkpoints" / "4"))
    capsys.readouterr()
    again = run(config, tmp_path)              # resumes at 2, trains 3 and 4 again
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("warning: corrupt or truncated checkpoint") == 1 and "step 4 (params/" in err, err
    assert "resuming at step 2" in captured.out
    # bitwise: the same program from the same state and data position
    assert [r["loss"] for r in metrics_log.read_metrics(tmp_path, "train")] == first_losses
    jax.tree.map(np.testing.assert_array_equal, params_numpy(again), params_numpy(first))


# --- a full disk ----------------------------------------------------------------------------------

@contextlib.contextmanager
def small_disk(directory: pathlib.Path, megabytes: int):
    """A tmpfs of `megabytes` at `directory` (skips the test where mounting is not permitted)."""
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}M", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=True)  # lazy: files a failed run left open


def fill(directory: pathlib.Path, leave_bytes: int) -> None:
    stat = os.statvfs(directory)
    with open(directory / "filler", "wb") as f:
        f.write(b"\0" * max(stat.f_bavail * stat.f_frsize - leave_bytes, 0))


def test_full_disk_during_a_save_is_one_error_and_keeps_earlier_steps(tmp_path):
    with small_disk(tmp_path / "disk", 4) as disk:
        workdir = disk / "run"
        save_steps(workdir, [1, 2])
        fill(disk, leave_bytes=8 << 10)
        checkpointer = TrainCheckpointer(workdir, keep=2)
        checkpointer.save(3, *small_state(3, size=200_000), {"consumed": 3}, {})
        with pytest.raises(CheckpointSaveError, match=r"checkpoint step 3 could not be written to .*: the disk is "
                                                      r"full; the complete checkpoints before it are intact \(steps \[1, 2\]\)"):
            checkpointer.wait()
        checkpointer.close()
        (disk / "filler").unlink()
        checkpointer = TrainCheckpointer(workdir, keep=2)
        assert checkpointer.latest_step() == 2 and checkpointer.problem(1) is None
        assert not any(p.name.startswith("3") for p in (workdir / "checkpoints").iterdir())  # cleaned up


def test_train_on_a_full_disk_prints_one_line_and_exits_2(tmp_path, capsys):
    from glm_jax.cli import main as cli

    config = tiny_config(steps=2)
    m = config.model
    data = tmp_path / "windows.npz"
    np.savez(data, **random_windows(96, m.emb_dim, m.num_pc))
    with small_disk(tmp_path / "disk", 4) as disk:
        workdir = disk / "run"
        argv = ["train", "--config", str(REPO_ROOT / "configs/tiny.py"), "--workdir", str(workdir),
                f"--config.data.train_pattern={data}", "--config.data.eval_pattern=", "--config.train.num_steps=4",
                "--config.train.checkpoint_every=2", "--config.train.log_every=2"]
        assert cli.main(argv[:-3] + ["--config.train.num_steps=2", "--config.train.checkpoint_every=2"]) == 0
        fill(disk, leave_bytes=48 << 10)  # room for the logs, not for another checkpoint
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "ERROR" not in err, err
        assert err.strip().splitlines()[-1].startswith(
            "glm-jax train: error: checkpoint step 4 could not be written to "), err
        (disk / "filler").unlink()
        assert TrainCheckpointer(workdir, keep=2, read_only=True).latest_step() == 2
        train_checkpoint.load_model_from_workdir(workdir)
