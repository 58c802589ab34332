"""Training under a real SLURM (tests/slurm/cluster.sh: one node on this machine): `srun -n 2
glm-jax train --distributed` and `sbatch launch/slurm.sbatch` with its time limit, requeue and
scancel. Skipped when no cluster answers (GLM_JAX_REQUIRE_SLURM=1, set by .ci/run, fails instead).

Each job runs 2 tasks x 1 CPU device of configs/tiny.py on random windows (tests/helpers.py).
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import REPO_ROOT, random_windows, repo_config

CLUSTER_SCRIPT = REPO_ROOT / "tests" / "slurm" / "cluster.sh"
SBATCH_SCRIPT = REPO_ROOT / "launch" / "slurm.sbatch"
DEFAULT_CLUSTER_CONF = pathlib.Path(os.environ.get("GLM_JAX_SLURM_DIR", "/tmp/glm-jax-slurm")) / "slurm.conf"
# The time-limited job: the script's own timer sends it USR1 GLM_JAX_SAVE_LEAD_S before the
# limit, so with --time=5 and a lead of 260 s it asks the tasks to save 40 s after the job starts
# (once they train); the limit itself, 5 minutes, leaves room for a slow start-up on a loaded
# machine. The default lead (45 s at --time=2 or 3) is checked without a cluster below.
TIME_LIMIT_OPTIONS = ("--time=5",)
TIME_LIMIT_LEAD_S = 260
EXTRA_STEPS = 30  # steps the requeued run trains after the checkpoint of the time limit


def _no_cluster(reason: str):
    if os.environ.get("GLM_JAX_REQUIRE_SLURM") == "1":
        pytest.fail(f"GLM_JAX_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(f"{reason}: start one with `{CLUSTER_SCRIPT.relative_to(REPO_ROOT)} start` (root, slurm-wlm, munge)")


@pytest.fixture(scope="module")
def slurm_env() -> dict:
    """The environment of SLURM commands and jobs: SLURM_CONF (the environment's, else the test
    cluster's), this venv's glm-jax first on PATH, 1 CPU device per process (no fake devices)."""
    conf = os.environ.get("SLURM_CONF") or (str(DEFAULT_CLUSTER_CONF) if DEFAULT_CLUSTER_CONF.is_file() else None)
    if shutil.which("sbatch") is None or conf is None:
        _no_cluster("no SLURM cluster (sbatch not installed or no slurm.conf)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("SLURM_")}
    bin_dir = str(pathlib.Path(sys.executable).parent)
    env.update(SLURM_CONF=conf, PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", JAX_PLATFORMS="cpu",
               GLM_JAX=str(pathlib.Path(bin_dir) / "glm-jax"), USE_TF="0", TF_CPP_MIN_LOG_LEVEL="3")
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        _no_cluster(f"sinfo ({conf}) did not answer within 20 s")
    if states.returncode != 0 or not re.search(r"idle|mixed|alloc", states.stdout):
        _no_cluster(f"no SLURM node up ({conf}): {(states.stderr or states.stdout).strip()[:200]}")
    return env


def slurm(env: dict, *args, timeout: float = 60) -> str:
    result = subprocess.run(list(map(str, args)), env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args[0]} failed: {result.stderr.strip()}"
    return result.stdout


def job_fields(env: dict, job: str) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    text = slurm(env, "scontrol", "show", "job", "-o", job)
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_until(condition, timeout: float, what: str, log: pathlib.Path | None = None):
    """Polls `condition()` until it returns something truthy (returned) or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"{what} did not happen within {timeout:.0f} s\n{tail}")


def final_state(env: dict, job: str, timeout: float, log: pathlib.Path) -> dict:
    """The job's fields once it has ended (and is not pending a requeue)."""
    return wait_until(lambda: (f := job_fields(env, job))["JobState"] in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT",
                                                                         "NODE_FAIL", "OUT_OF_MEMORY") and f,
                      timeout, f"the end of job {job}", log)


@pytest.fixture
def run_dir(tmp_path) -> pathlib.Path:
    """Training windows and a config: configs/tiny.py (2 layers, 22k parameters) whose num_steps
    is read from the file `num_steps` next to it, so a test can change it between runs of a job."""
    model = repo_config("tiny").model
    np.savez(tmp_path / "train.npz", **random_windows(64, model.emb_dim, model.num_pc, seed=0))
    (tmp_path / "num_steps").write_text("1000000")
    (tmp_path / "config.py").write_text(
        "import pathlib\nfrom glm_jax.config import load_config\n\n\ndef get_config():\n"
        f"    config = load_config({str(REPO_ROOT / 'configs' / 'tiny.py')!r})\n"
        "    config.train.num_steps = int(pathlib.Path(__file__).with_name('num_steps').read_text())\n"
        "    return config\n")
    return tmp_path


def train_args(run_dir: pathlib.Path, workdir: str) -> list[str]:
    """CONFIG WORKDIR overrides: no eval, a checkpoint only at the end or on a signal."""
    return [str(run_dir / "config.py"), str(run_dir / workdir), f"--config.data.train_pattern={run_dir / 'train.npz'}",
            "--config.data.eval_pattern=", "--config.train.log_every=20", "--config.train.checkpoint_every=1000000"]


def sbatch(env: dict, run_dir: pathlib.Path, workdir: str, *options: str, **job_env: str) -> tuple[str, pathlib.Path]:
    """Submits launch/slurm.sbatch with 2 tasks; `job_env` is added to the environment the job gets."""
    log = run_dir / f"{workdir}.out"
    job = slurm({**env, **job_env}, "sbatch", "--parsable", "--ntasks-per-node=2", f"--output={log}", *options,
                SBATCH_SCRIPT, *train_args(run_dir, workdir)).strip().split(";")[0]
    return job, log


def params(workdir: pathlib.Path) -> dict:
    from glm_jax.train.checkpoint import load_model_from_workdir

    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(load_model_from_workdir(workdir), nnx.Param)))


def newest_step(workdir: pathlib.Path) -> int:
    return max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slurm
def test_time_limited_job_saves_requeues_and_ends_equal_to_an_uninterrupted_srun_run(slurm_env, run_dir):
    """sbatch launch/slurm.sbatch with 2 tasks and a 5-minute limit: the script's timer fires
    GLM_JAX_SAVE_LEAD_S before the limit -> every task saves at one step K and exits 0 -> the script requeues the job -> run 2 resumes at
    K and trains to K + EXTRA_STEPS. `srun -n 2 glm-jax train --distributed` of K + EXTRA_STEPS
    steps from scratch ends with the same parameters, bit for bit.

    Run 1 trains with num_steps 10^6, so the time limit always interrupts it whatever the machine's
    speed; the test then sets num_steps (read from a file by the config) to K + EXTRA_STEPS and
    lifts the time limit, so run 2 finishes. The learning rate (warmup_constant) and the data order
    do not depend on num_steps, so this is the trajectory of a K + EXTRA_STEPS run.
    """
    job, log = sbatch(slurm_env, run_dir, "job", *TIME_LIMIT_OPTIONS, GLM_JAX_SAVE_LEAD_S=str(TIME_LIMIT_LEAD_S))
    try:
        match = wait_until(lambda: re.search(r"glm-jax train: preempted at step (\d+)", log.read_text()
                                             if log.exists() else ""), 360, "a save at the time limit", log)
        total = int(match.group(1)) + EXTRA_STEPS
        (run_dir / "num_steps").write_text(str(total))  # before run 2 starts: the requeue waits cred_expire (5 s)
        slurm(slurm_env, "scontrol", "update", f"JobId={job}", "TimeLimit=30")
        fields = final_state(slurm_env, job, 300, log)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)
    out = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", out[-3000:]
    assert fields["Restarts"] == "1", out[-3000:]
    assert f"slurm.sbatch: time limit 300 s: the tasks save and the job requeues {TIME_LIMIT_LEAD_S} s before it" in out
    assert "slurm.sbatch: time-limit signal (run 1 of job" in out
    assert "slurm.sbatch: run 1 of job" in out and "requeueing the job" in out
    assert f"resuming at step {match.group(1)}" in out and f"glm-jax train: stopped at step {total}" in out
    assert "slurm.sbatch: run 2 of job" in out and out.rstrip().endswith("training finished"), out[-2000:]
    assert newest_step(run_dir / "job") == total

    config, workdir, *overrides = train_args(run_dir, "reference")
    reference = subprocess.run(
        ["srun", "-n", "2", "--time=5", "--kill-on-bad-exit=1", slurm_env["GLM_JAX"], "train", "--distributed",
         "--config", config, "--workdir", workdir, *overrides],
        env=slurm_env, capture_output=True, text=True, timeout=400)
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-2000:]
    assert f"glm-jax train: stopped at step {total}" in reference.stdout
    assert "new run" in reference.stdout and "resuming" not in reference.stdout
    resumed = jax.tree_util.tree_flatten_with_path(params(run_dir / "job"))[0]
    uninterrupted = jax.tree.leaves(params(run_dir / "reference"))
    assert len(resumed) == len(uninterrupted) > 0
    differing = [jax.tree_util.keystr(path) for (path, a), b in zip(resumed, uninterrupted) if not np.array_equal(a, b)]
    assert not differing, differing


@pytest.mark.slurm
def test_scancel_saves_and_stops_without_requeue(slurm_env, run_dir):
    """scancel of a running job: SIGTERM to every task and the batch script -> a checkpoint at the
    step the tasks agree on, every task exits 0, the job ends CANCELLED and is not requeued."""
    job, log = sbatch(slurm_env, run_dir, "job", "--time=10")  # the default timer: 150 s before the limit
    metrics = run_dir / "job" / "metrics.jsonl"
    try:
        wait_until(lambda: metrics.exists() and '"train"' in metrics.read_text(), 240, "a first logged step", log)
        slurm(slurm_env, "scancel", job)
        fields = final_state(slurm_env, job, 120, log)
        # the batch script's last line comes after the tasks have exited
        wait_until(lambda: "slurm.sbatch: run 1 of job" in log.read_text().splitlines()[-1], 60, "the script's end", log)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)
    out = log.read_text()
    step = int(re.search(r"glm-jax train: preempted at step (\d+)", out).group(1))
    assert newest_step(run_dir / "job") == step >= 20
    assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", out[-2000:]
    assert "stopped early (checkpoint saved)" in out.splitlines()[-1]  # srun exit status 0: every task exited 0
    assert "requeueing" not in out


@pytest.mark.slurm
def test_a_save_cut_by_the_time_limit_still_requeues(slurm_env, run_dir):
    """SLURM's own SIGTERM at the time limit reaches the tasks while they train (here the timer is
    off, GLM_JAX_SAVE_LEAD_S=0; in use, a save slower than its lead): they save and exit 0, and the
    script, seeing Reason=TimeLimit, requeues the job instead of taking the signal for a scancel.
    The limit is cut to just past the job's run time once it trains, so the test waits seconds."""
    job, log = sbatch(slurm_env, run_dir, "job", "--time=5", GLM_JAX_SAVE_LEAD_S="0")
    metrics = run_dir / "job" / "metrics.jsonl"
    try:
        wait_until(lambda: metrics.exists() and '"train"' in metrics.read_text(), 240, "a first logged step", log)
        run_time = sum(int(x) * 60 ** i for i, x in enumerate(reversed(job_fields(slurm_env, job)["RunTime"].split(":"))))
        limit = run_time + 5
        slurm(slurm_env, "scontrol", "update", f"JobId={job}", f"TimeLimit={limit // 60}:{limit % 60:02d}")
        wait_until(lambda: "requeueing the job" in log.read_text(), 120, "the requeue after the time limit", log)
        wait_until(lambda: int(job_fields(slurm_env, job)["Restarts"]) == 1, 60, "Restarts=1", log)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)
    out = log.read_text()
    step = int(re.search(r"glm-jax train: preempted at step (\d+)", out).group(1))
    assert newest_step(run_dir / "job") == step
    assert "no save timer (GLM_JAX_SAVE_LEAD_S=0)" in out and "time-limit signal" not in out
    assert "the SIGTERM came from the time limit, not from scancel" in out


def timer_functions(*calls: str, **env: str) -> list[str]:
    """Runs launch/slurm.sbatch's time-limit functions (the block between its '--- the time-limit
    timer' markers) in bash without a cluster; one output line per call ('-' when it fails)."""
    script = SBATCH_SCRIPT.read_text()
    block = script[script.index("# --- the time-limit timer"):script.index("# --- end of the time-limit timer")]
    body = "".join(f"{call} || echo -\n" for call in calls)
    env = {k: v for k, v in os.environ.items() if k != "GLM_JAX_SAVE_LEAD_S"} | env
    result = subprocess.run(["bash", "-c", block + body], env=env, capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_save_lead_adapts_to_the_time_limit():
    """The lead of the script's save timer: 300 s for long jobs, a quarter of short ones but at
    least 45 s (at most half the limit), GLM_JAX_SAVE_LEAD_S when set; SLURM's time formats
    (squeue %l / %L) in seconds, none for UNLIMITED."""
    limits = {"1:00": 30, "2:00": 45, "3:00": 45, "5:00": 75, "10:00": 150, "20:00": 300, "1:00:00": 300,
              "2-00:00:00": 300}
    leads = timer_functions(*(f"save_lead $(slurm_seconds {limit})" for limit in limits))
    assert leads == [str(lead) for lead in limits.values()]
    assert timer_functions("save_lead 120", "save_lead 86400", GLM_JAX_SAVE_LEAD_S="600") == ["600", "600"]
    assert timer_functions("slurm_seconds 4:59", "slurm_seconds 1:02:03", "slurm_seconds 1-01:59:59",
                           "slurm_seconds UNLIMITED", "slurm_seconds NOT_SET") == ["299", "3723", "93599", "-", "-"]
