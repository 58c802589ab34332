"""Where the processes of a run come from (glm_jax.distributed), checked without starting any:
explicit options, GLM_JAX_* variables, a faked SLURM environment (the GPUs each task is given),
and what reaches `jax.distributed.initialize`; the one-line CLI errors; the launcher's pieces."""
from __future__ import annotations

import subprocess
import sys

import pytest

from glm_jax import distributed, launcher
from glm_jax.errors import DistributedError

# One task per node on 2 nodes with 8 GPUs each: what `srun` sets in the launcher's job step.
SLURM_ONE_TASK_PER_NODE = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
                           "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[017-018]",
                           "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}


def test_explicit_options_win_over_environment():
    environ = {"GLM_JAX_COORDINATOR": "h:1", "GLM_JAX_NUM_PROCESSES": "4", "GLM_JAX_PROCESS_ID": "3",
               **SLURM_ONE_TASK_PER_NODE}
    assert distributed.detect("node0:1234", 2, 1, environ=environ) == distributed.Cluster("explicit", "node0:1234", 2, 1)
    assert distributed.detect(environ=environ) == distributed.Cluster("environment", "h:1", 4, 3)


@pytest.mark.parametrize("args, message", [
    (("h:1", 2, None), "--process-id missing"),
    (("h", 2, 0), "must be HOST:PORT"),
    (("h:1", 2, 2), "0 <= --process-id < --num-processes"),
])
def test_incomplete_or_wrong_explicit_options(args, message):
    with pytest.raises(DistributedError, match=message):
        distributed.detect(*args, environ={})


def test_no_cluster_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(distributed, "_jax_detects_cluster", lambda: False)
    with pytest.raises(DistributedError, match="no cluster found"):
        distributed.detect(environ={})
    with pytest.raises(DistributedError, match="srun"):  # salloc / sbatch shell, no job step
        distributed.detect(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"})


def test_slurm_one_task_per_node_sees_every_gpu_of_its_node():
    """JAX alone would give this task local_device_ids=[SLURM_LOCALID] = [0]: one GPU of eight."""
    cluster = distributed.detect(environ=SLURM_ONE_TASK_PER_NODE, gpu_count=8)
    assert cluster == distributed.Cluster("slurm", f"gpu017:{4242 % 4096 + 61440}", 2, 1, tuple(range(8)))


@pytest.mark.parametrize("extra, gpus, expected", [
    ({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 8, (0, 1, 2, 3)),       # CUDA renumbers what it shows from 0
    ({"JAX_LOCAL_DEVICE_IDS": "2,3"}, 8, (2, 3)),                   # the user's choice wins
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_LOCALID": "1"}, 8, (4, 5, 6, 7)),  # 2 tasks share 8
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_LOCALID": "1", "SLURM_GPUS_PER_TASK": "4",
      "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 8, (0, 1, 2, 3)),        # SLURM bound GPUs per task already
    ({}, 0, None),                                                   # CPU nodes: nothing to restrict
])
def test_slurm_gpus_of_a_task(extra, gpus, expected):
    cluster = distributed.detect(environ=SLURM_ONE_TASK_PER_NODE | extra, gpu_count=gpus)
    assert cluster.local_device_ids == expected


def test_slurm_coordinator_address_and_port_override():
    env = SLURM_ONE_TASK_PER_NODE | {"SLURM_STEP_NODELIST": "a-1,b-2", "JAX_COORDINATOR_PORT": "5000"}
    assert distributed.slurm_coordinator(env) == "a-1:5000"
    assert distributed.slurm_coordinator(SLURM_ONE_TASK_PER_NODE | {"SLURM_STEP_NODELIST": "n[3,7-9]"}).startswith("n3:")
    assert distributed.tasks_on_node({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}) == 1


def test_initialize_under_faked_slurm_passes_every_gpu_to_jax(monkeypatch):
    """What `jax.distributed.initialize` receives for a one-task-per-node GPU job: explicit
    local_device_ids of all 8 GPUs and JAX's own SLURM detection switched off, bounded timeouts."""
    import jax
    for name in list(SLURM_ONE_TASK_PER_NODE) + ["CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS", "GLM_JAX_COORDINATOR",
                                                 "GLM_JAX_NUM_PROCESSES", "GLM_JAX_PROCESS_ID"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in SLURM_ONE_TASK_PER_NODE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GLM_JAX_HEARTBEAT_TIMEOUT", "12")
    monkeypatch.setattr(distributed, "node_gpu_count", lambda: 8)
    monkeypatch.setattr(distributed, "check_coordinator", lambda cluster, wait_s: None)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    distributed.initialize()
    assert calls == [dict(coordinator_address=f"gpu017:{4242 % 4096 + 61440}", num_processes=2, process_id=1,
                          local_device_ids=list(range(8)), cluster_detection_method="deactivate",
                          initialization_timeout=60, heartbeat_timeout_seconds=12, shutdown_timeout_seconds=30)]


def test_unreachable_coordinator_fails_in_bounded_time(monkeypatch):
    monkeypatch.setenv("GLM_JAX_INIT_TIMEOUT", "1")
    cluster = distributed.Cluster("explicit", f"127.0.0.1:{launcher.free_port()}", 2, 1)
    with pytest.raises(DistributedError, match="cannot be reached within 1 s"):
        distributed.check_coordinator(cluster, 1)


def test_cli_distributed_without_cluster_is_one_line(tmp_path):
    """`glm-jax train --distributed` outside any cluster: one line, exit 2, nothing written."""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("SLURM_", "GLM_JAX_", "TPU_"))}
    out = subprocess.run([sys.executable, "-m", "glm_jax.cli", "train", "--config", "configs/tiny.py",
                          "--workdir", str(tmp_path / "w"), "--distributed"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "no cluster found" in out.stderr and not (tmp_path / "w").exists()


def test_launcher_environment_of_a_child():
    env = launcher.child_environment({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"},
                                     "127.0.0.1:9", 2, 1, 4)
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    assert (env["GLM_JAX_COORDINATOR"], env["GLM_JAX_NUM_PROCESSES"], env["GLM_JAX_PROCESS_ID"]) == ("127.0.0.1:9", "2", "1")
    assert launcher.exit_status(-9) == 137


# --- process counts that do not divide the work ------------------------------------------------

def test_shards_that_do_not_split_over_the_processes_are_refused(tmp_path, monkeypatch):
    """3 shards on 2 processes: host 0 would read 2, host 1 one (epochs of different lengths)."""
    import jax

    from glm_jax.train import trainer
    for i in range(3):
        (tmp_path / f"train-{i:05d}-of-00003.tfrecord").write_bytes(b"")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(DistributedError, match="3 shards do not split evenly over 2 processes"):
        trainer.open_reader(str(tmp_path / "train-*.tfrecord"), "train", 8, 0, True)


def test_cli_batch_that_does_not_split_over_the_processes_is_one_line(tmp_path, monkeypatch, capsys):
    import jax

    from glm_jax.cli.main import main
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    code = main(["train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
                 "--config.data.train_pattern=unused.npz"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "batch_size 16" in err and "3 hosts" in err, err
    assert not (tmp_path / "w").exists()


# --- glm-jax launch-local ----------------------------------------------------------------------

CHILD = ("import os, signal, sys, time\n"
         "i = int(os.environ['GLM_JAX_PROCESS_ID'])\n"
         "signal.signal(signal.SIGTERM, lambda *a: (print(f'TERM {i}', flush=True), sys.exit(0)))\n"
         "print(f'up {i} of', os.environ['GLM_JAX_NUM_PROCESSES'], os.environ['XLA_FLAGS'], flush=True)\n"
         "print(f'oops {i}', file=sys.stderr, flush=True)\n"
         "if i == int(sys.argv[1]): sys.exit(3)\n"
         "time.sleep(60)\n")


def _launch(*child_args, signal_after=None, signum=None):
    import signal
    import time
    command = [sys.executable, "-m", "glm_jax.cli", "launch-local", "--processes", "2", "--devices-per-process", "3",
               "--stop-timeout", "5", "--", sys.executable, "-c", CHILD, *child_args]
    started = time.monotonic()
    launcher_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signal_after is not None:
        time.sleep(signal_after)
        launcher_process.send_signal(signum or signal.SIGTERM)
    out, err = launcher_process.communicate(timeout=60)
    return launcher_process.returncode, out, err, time.monotonic() - started


def test_launch_local_prefixes_output_and_stops_the_others_when_one_fails():
    code, out, err, seconds = _launch("1")
    assert code == 3, (out, err)  # the failed child's status
    assert "[p0] up 0 of 2 --xla_force_host_platform_device_count=3" in out and "[p1] up 1 of 2" in out
    assert "[p0] oops 0" in err and "[p1] oops 1" in err  # every process's errors reach the terminal
    assert "[p0] TERM 0" in out and seconds < 20  # the survivor was stopped at once, not after 60 s


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_launch_local_passes_sigterm_and_ctrl_c_to_every_child_as_sigterm(signum):
    import signal
    code, out, err, _ = _launch("-1", signal_after=3, signum=getattr(signal, signum))
    assert code == 0 and "[p0] TERM 0" in out and "[p1] TERM 1" in out, (out, err)
