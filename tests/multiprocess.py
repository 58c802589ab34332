"""Test harness: N local JAX processes of one run (glm_jax.launcher.LocalRun), with short timeouts.

    from multiprocess import run_processes, start_processes
    result = run_processes([sys.executable, "script.py", ...], processes=2, devices_per_process=4)
    assert result.codes == [0, 0], result.logs

Each process gets GLM_JAX_COORDINATOR (a free port) / GLM_JAX_NUM_PROCESSES / GLM_JAX_PROCESS_ID
(so a script calls `glm_jax.distributed.initialize()` with no arguments), K CPU devices,
PYTHONPATH with the tests folder (scripts import `helpers`), JAX_PLATFORMS=cpu and short
distributed timeouts (a lost peer ends the others within HEARTBEAT_S). Modelled on
jax/_src/test_multiprocess.py: free port, per-process logs, a timeout on the whole run.
"""
from __future__ import annotations

import dataclasses
import io
import os
import sys
import time
from typing import Optional, Sequence

from glm_jax.launcher import LocalRun

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
INIT_TIMEOUT_S = 60
HEARTBEAT_S = 10     # a SIGKILLed peer is declared dead after this many seconds
SHUTDOWN_S = 10
RUN_TIMEOUT_S = 240  # a whole multi-process run (kills everything after this; the test then fails)


@dataclasses.dataclass
class Result:
    codes: list[int]      # exit status per process (128 + N when killed by signal N)
    logs: list[str]       # stdout and stderr lines of each process
    seconds: float

    def __str__(self) -> str:  # what a failed assertion shows
        return "\n".join(f"--- process {i} exit {c} ---\n{_clip(log)}" for i, (c, log) in
                         enumerate(zip(self.codes, self.logs)))


def _clip(log: str, keep: int = 3000) -> str:
    """The start and the end of a long log (the first error is often near the start)."""
    lines = [line for line in log.splitlines() if not line.startswith(("[Gloo]", "    @ "))]
    text = "\n".join(lines)
    return text if len(text) <= 2 * keep else text[:keep] + "\n...\n" + text[-keep:]


def environment(extra: Optional[dict] = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GLM_JAX_", "TPU_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS_DIR, REPO_ROOT, env.get("PYTHONPATH")]))
    env.update({"JAX_PLATFORMS": "cpu", "USE_TF": "0", "TF_CPP_MIN_LOG_LEVEL": "3",
                "GLM_JAX_INIT_TIMEOUT": str(INIT_TIMEOUT_S), "GLM_JAX_HEARTBEAT_TIMEOUT": str(HEARTBEAT_S),
                "GLM_JAX_SHUTDOWN_TIMEOUT": str(SHUTDOWN_S)})
    return env | (extra or {})


def start_processes(command: Sequence[str], processes: int, devices_per_process: int = 1,
                    env: Optional[dict] = None, stop_timeout: float = 10.0, stop_on_failure: bool = True) -> LocalRun:
    """Starts the processes and returns the run (send_signal, poll, wait, lines); output is kept
    in `run.lines`, not printed. stop_on_failure=False: a failing process does not make the
    harness stop the others (to test what they do on their own)."""
    return LocalRun(command, processes, devices_per_process, env=environment(env), stop_timeout=stop_timeout,
                    stdout=io.StringIO(), stderr=io.StringIO(), cwd=REPO_ROOT, stop_on_failure=stop_on_failure).start()


def finish(run: LocalRun, started: float, timeout: float = RUN_TIMEOUT_S) -> Result:
    codes = run.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
    return Result(codes, [run.text(i) for i in range(run.processes)], time.monotonic() - started)


def run_processes(command: Sequence[str], processes: int, devices_per_process: int = 1,
                  env: Optional[dict] = None, timeout: float = RUN_TIMEOUT_S) -> Result:
    """Runs `command` as `processes` processes of one run to the end."""
    started = time.monotonic()
    return finish(start_processes(command, processes, devices_per_process, env), started, timeout)


def wait_for_line(run: LocalRun, text: str, timeout: float, index: Optional[int] = None) -> bool:
    """Waits until a process (`index`, or all of them) printed a line containing `text`."""
    deadline = time.monotonic() + timeout
    indices = range(run.processes) if index is None else [index]
    while time.monotonic() < deadline:
        if all(any(text in line for line in list(run.lines[i])) for i in indices):
            return True
        if run.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def python(script: str, *args) -> list[str]:
    """The command line of a script in tests/scripts/ under this interpreter."""
    return [sys.executable, os.path.join(TESTS_DIR, "scripts", script), *map(str, args)]
