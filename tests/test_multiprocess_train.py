"""Training as 2 JAX processes x 4 CPU devices (tests/multiprocess.py), against 1 process x 8.

How the global batch is made the same: both runs read one .npz of windows with
`trainer.open_reader` (an `InMemoryWindows`): each epoch is one seeded permutation of all windows
cut into global batches of 16, and host p of P yields rows [8p, 8p + 8) of each, which
`make_array_from_process_local_data` stacks in process order, so the 2-process run assembles
exactly the global batches that the 1-process reference (in this pytest process: 8 devices, the
same (4, 2, 1) mesh) reads whole; `test_each_host_reads_its_rows_of_the_global_batch` checks it.
Gene masks and dropout are drawn over the global batch from the step's key, so only the float
reduction order differs (gloo's cross-process sums vs one process's).

Process launches (the expensive part, ~10-30 s each on 2 cores) are shared: one run of both
objective reductions with accumulation across hosts (`two_process_run`), one interrupted by
SIGTERM, one by SIGKILL of process 1, and one that resumes both.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import signal
import time

import numpy as np
import pytest

from helpers import SCRIPTS_DIR, random_windows
from multiprocess import HEARTBEAT_S, SHUTDOWN_S, finish, python, run_processes, start_processes, wait_for_line

from glm_jax.train import metrics_log

pytestmark = pytest.mark.multiprocess

STEPS, ACCUMULATION = 4, 2
REDUCTIONS = ("all_positions", "masked_genes")
# A lost peer: the survivor's collective fails at once (gloo: connection reset) and it waits
# SHUTDOWN_S for its peers at exit, or JAX's heartbeat check ends it after HEARTBEAT_S.
LOST_PEER_BOUND_S = max(HEARTBEAT_S, SHUTDOWN_S) + 25


def _mp_train():
    spec = importlib.util.spec_from_file_location("mp_train", SCRIPTS_DIR / "mp_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def windows_npz(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("mp-data") / "windows.npz"
    np.savez(path, **random_windows(64, 33, 12, seed=5))
    return str(path)


@pytest.fixture(scope="module")
def two_process_run(windows_npz, tmp_path_factory):
    """2 x 4 devices, accumulation 2, one workdir per reduction."""
    root = tmp_path_factory.mktemp("mp-run")
    workdirs = [root / r for r in REDUCTIONS]
    result = run_processes(python("mp_train.py", windows_npz, ",".join(map(str, workdirs)), "--steps", STEPS,
                                  "--reduction", ",".join(REDUCTIONS), "--accumulation", ACCUMULATION),
                           processes=2, devices_per_process=4)
    assert result.codes == [0, 0], result
    return result, dict(zip(REDUCTIONS, workdirs))


def read_params(workdir) -> dict:
    with np.load(pathlib.Path(workdir) / "params.npz") as f:
        return dict(f)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_two_processes_accumulating_equal_one_process_with_one_large_batch(two_process_run, windows_npz, tmp_path,
                                                                             reduction):
    """Losses per step and parameters after STEPS steps: 2 hosts x 2 microbatches each vs one
    process taking the global batch whole (accumulation 1), under both loss reductions
    (masked_genes weighs microbatches by their masked-gene counts, all_positions equally)."""
    _, workdirs = two_process_run
    _mp_train().train_one(windows_npz, str(tmp_path), reduction, steps=STEPS, accumulation=1,
                          checkpoint_every=STEPS)
    multi, single = (metrics_log.read_metrics(w, "train") for w in (workdirs[reduction], tmp_path))
    assert [r["step"] for r in multi] == list(range(1, STEPS + 1))  # written once, by process 0
    np.testing.assert_allclose([r["loss"] for r in multi], [r["loss"] for r in single], rtol=2e-5)
    expected = read_params(tmp_path)
    got = read_params(workdirs[reduction])
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=2e-4, atol=2e-6, err_msg=name)
    other = metrics_log.read_metrics(workdirs[next(r for r in REDUCTIONS if r != reduction)], "train")
    assert [r["loss"] for r in other] != [r["loss"] for r in multi]  # the reductions are told apart


def test_each_host_reads_its_rows_of_the_global_batch(two_process_run, windows_npz):
    """Host p's windows are rows [8p, 8p + 8) of what one process reads as a global batch."""
    from glm_jax.train import trainer
    _, workdirs = two_process_run
    reader = trainer.open_reader(windows_npz, "train", 16, _mp_train().config_for(windows_npz, STEPS).train.seed, True)
    global_batches = [next(reader)["window_index"].tolist() for _ in range(STEPS)]
    hosts = [json.loads((workdirs["all_positions"] / f"windows-p{p}.json").read_text())[1:] for p in (0, 1)]
    assert [h0 + h1 for h0, h1 in zip(*hosts)] == global_batches  # [0] is the start-up check's read


def _interrupted_runs(windows_npz, root: pathlib.Path):
    """SIGTERM to both processes mid-run, SIGKILL to process 1 of another run; then one launch
    that resumes both workdirs. Returns what each phase left."""
    common = ("--steps", STEPS, "--accumulation", ACCUMULATION)
    phases = {}
    started = time.monotonic()
    # nothing else would stop or save this run before step 100: not a log step, not a checkpoint step
    run = start_processes(python("mp_train.py", windows_npz, root / "term", *common, "--delay", 1.5,
                                 "--checkpoint-every", 100, "--log-every", 100), 2, 4)
    assert wait_for_line(run, "step 2", 180), finish(run, started)  # both are in the loop
    run.send_signal(signal.SIGTERM)
    phases["term"] = finish(run, started)
    phases["term_checkpoints"] = sorted(int(p.name) for p in (root / "term" / "checkpoints").iterdir()
                                        if p.name.isdigit())

    started = time.monotonic()
    run = start_processes(python("mp_train.py", windows_npz, root / "kill", *common, "--delay", 1.5,
                                 "--checkpoint-every", 1), 2, 4, stop_on_failure=False)
    assert wait_for_line(run, "step 3", 180), finish(run, started)
    run.send_signal(signal.SIGKILL, index=1)
    killed = time.monotonic()
    while run.children[0].poll() is None and time.monotonic() - killed < LOST_PEER_BOUND_S + 30:
        time.sleep(0.1)
    phases["kill_exit_s"] = time.monotonic() - killed
    phases["kill"] = finish(run, started)

    phases["resume"] = run_processes(python("mp_train.py", windows_npz, f"{root / 'term'},{root / 'kill'}",
                                            "--reduction", "all_positions,all_positions", *common), 2, 4)
    return phases


@pytest.fixture(scope="module")
def interrupted(windows_npz, tmp_path_factory):
    root = tmp_path_factory.mktemp("mp-faults")
    return _interrupted_runs(windows_npz, root), root


def test_sigterm_saves_one_checkpoint_at_an_agreed_step_and_resumes_bit_for_bit(interrupted, two_process_run):
    phases, root = interrupted
    term = phases["term"]
    assert term.codes == [0, 0], term
    saved = phases["term_checkpoints"]  # checkpoint_every is 100: only the preemption's
    assert len(saved) == 1 and 1 <= saved[0] < STEPS, saved
    assert all(f"at step {saved[0]} preempted=True" in log for log in term.logs), term  # the same step on both
    assert phases["resume"].codes == [0, 0], phases["resume"]
    expected, got = read_params(two_process_run[1]["all_positions"]), read_params(root / "term")
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_sigkill_of_one_process_stops_the_other_in_bounded_time_and_rerun_resumes(interrupted, two_process_run):
    phases, root = interrupted
    kill = phases["kill"]
    assert kill.codes[1] == 128 + signal.SIGKILL and kill.codes[0] != 0, kill
    assert phases["kill_exit_s"] < LOST_PEER_BOUND_S, (phases["kill_exit_s"], kill)
    assert phases["resume"].codes == [0, 0], phases["resume"]
    assert "resuming at step" in phases["resume"].logs[0], phases["resume"]
    expected, got = read_params(two_process_run[1]["all_positions"]), read_params(root / "kill")
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_cli_train_distributed_under_launch_local_reports_each_process_error_in_one_line(tmp_path):
    """`glm-jax launch-local -- glm-jax train --distributed ...` with data that does not exist:
    both processes join the run (GLM_JAX_* from the launcher), fail with one prefixed line each,
    and the launcher exits with their status (2)."""
    import subprocess
    import sys

    from multiprocess import environment
    command = [sys.executable, "-m", "glm_jax.cli", "launch-local", "--processes", "2", "--devices-per-process", "4",
               "--", "glm-jax", "train", "--distributed", "--config", "configs/tiny.py",
               "--workdir", str(tmp_path / "w"), f"--config.data.train_pattern={tmp_path / 'missing.npz'}"]
    out = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=180,
                         cwd=pathlib.Path(__file__).parents[1])
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode == 2, out.stderr
    assert sorted(line.split()[0] for line in errors) == ["[p0]", "[p1]"], out.stderr
    assert all("missing.npz" in line for line in errors) and not (tmp_path / "w").exists()
