"""N local JAX processes as one run: `glm-jax launch-local --processes N [--devices-per-process K] -- COMMAND`.

For trying a multi-host run on one machine, and for the multi-process tests. Each child gets
GLM_JAX_COORDINATOR=127.0.0.1:PORT (a free port), GLM_JAX_NUM_PROCESSES=N and
GLM_JAX_PROCESS_ID=I (what `glm_jax.distributed.initialize` reads), and with K given
`--xla_force_host_platform_device_count=K` in XLA_FLAGS (K CPU devices per process).

- Every line a child writes reaches the terminal prefixed with `[pI] `: its stdout on stdout,
  its stderr on stderr, so every process's errors are seen.
- When a child exits non-zero the others get SIGTERM, and SIGKILL `stop_timeout` seconds later
  (default 10): all children are gone within that bound after the first failure.
- SIGTERM or SIGINT (Ctrl-C) sent to the launcher reaches every child as SIGTERM (a training run
  saves a checkpoint and exits 0); a second Ctrl-C kills them. The children run in their own
  process groups, so a Ctrl-C on the terminal reaches them only through the launcher.
- Exit status: that of the first child to exit non-zero (128 + N for a child killed by signal
  N), else 0.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Optional, Sequence

from glm_jax.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
STOP_TIMEOUT_S = 10.0
GLOO_CHATTER = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks")


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it; a race with other programs is possible
    but unlikely in the moment between here and the coordinator binding it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_device_count(xla_flags: str, count: int) -> str:
    """XLA_FLAGS with the host-platform device count set to `count` (replacing any earlier one)."""
    kept = [flag for flag in shlex.split(xla_flags) if not flag.startswith(DEVICE_COUNT_FLAG)]
    return " ".join(kept + [f"{DEVICE_COUNT_FLAG}={count}"])


def child_environment(base: dict, coordinator: str, processes: int, index: int,
                      devices_per_process: Optional[int]) -> dict:
    """The environment of child `index` of `processes`."""
    env = dict(base)
    env.update({ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(processes), ENV_PROCESS_ID: str(index),
                "PYTHONUNBUFFERED": "1"})
    if devices_per_process is not None:
        env["XLA_FLAGS"] = with_device_count(env.get("XLA_FLAGS", ""), devices_per_process)
    return env


def resolve_command(command: Sequence[str]) -> list[str]:
    """`glm-jax ...` runs with this interpreter (`python -m glm_jax.cli`), found with or without
    the virtual environment on PATH."""
    command = list(command)
    if command and command[0] == "glm-jax":
        return [sys.executable, "-m", "glm_jax.cli", *command[1:]]
    return command


def exit_status(returncode: int) -> int:
    """A child's return code as a shell reports it (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


class LocalRun:
    """`processes` children of `command` forming one JAX run (see the module docstring).

    stdout / stderr: where prefixed lines go (default the launcher's); `lines[i]` keeps every
    line of child i (both streams, in arrival order per stream) for callers such as tests.
    stop_on_failure=False leaves the others running after a failure (tests of what they do alone).
    """

    def __init__(self, command: Sequence[str], processes: int, devices_per_process: Optional[int] = None, *,
                 env: Optional[dict] = None, port: Optional[int] = None, stop_timeout: float = STOP_TIMEOUT_S,
                 stdout: Optional[IO[str]] = None, stderr: Optional[IO[str]] = None, cwd=None,
                 stop_on_failure: bool = True):
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.command = resolve_command(command)
        self.processes, self.devices_per_process = processes, devices_per_process
        self.coordinator = f"127.0.0.1:{port or free_port()}"
        self.env = dict(os.environ if env is None else env)
        self.stop_timeout, self.cwd, self.stop_on_failure = stop_timeout, cwd, stop_on_failure
        self.stdout, self.stderr = stdout or sys.stdout, stderr or sys.stderr
        self.children: list[subprocess.Popen] = []
        self.lines: list[list[str]] = [[] for _ in range(processes)]
        self.first_failure: Optional[tuple[int, int]] = None  # (child, exit status)
        self._threads: list[threading.Thread] = []
        self._write_lock = threading.Lock()

    def start(self) -> "LocalRun":
        for index in range(self.processes):
            env = child_environment(self.env, self.coordinator, self.processes, index, self.devices_per_process)
            child = subprocess.Popen(self.command, env=env, cwd=self.cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1,
                                     start_new_session=True)
            self.children.append(child)
            for pipe, out in ((child.stdout, self.stdout), (child.stderr, self.stderr)):
                thread = threading.Thread(target=self._copy, args=(index, pipe, out), daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def _copy(self, index: int, pipe: IO[str], out: IO[str]) -> None:
        for line in pipe:
            self.lines[index].append(line)
            if GLOO_CHATTER.match(line):  # gloo prints one per collective group it sets up
                continue
            with self._write_lock:
                out.write(f"[p{index}] {line if line.endswith(chr(10)) else line + chr(10)}")
                out.flush()
        pipe.close()

    def send_signal(self, signum: int, index: Optional[int] = None) -> None:
        """Sends `signum` to child `index` (default: every child still running)."""
        for i, child in enumerate(self.children):
            if (index is None or i == index) and child.poll() is None:
                try:
                    os.killpg(child.pid, signum)
                except ProcessLookupError:
                    pass

    def poll(self) -> Optional[list[int]]:
        """Exit statuses once every child has exited, else None; on the first non-zero exit the
        others are stopped (SIGTERM now, SIGKILL after `stop_timeout`)."""
        codes = [child.poll() for child in self.children]
        if self.first_failure is None:
            failed = [(i, exit_status(c)) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                self.first_failure = failed[0]
                if self.stop_on_failure:
                    self._stop_others()
        return None if None in codes else [exit_status(c) for c in codes]

    def _stop_others(self) -> None:
        self.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline and any(c.poll() is None for c in self.children):
            time.sleep(0.05)
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: Optional[float] = None) -> list[int]:
        """Waits for every child (stopping the others after a failure); returns exit statuses.
        After `timeout` seconds every child is killed and TimeoutError raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (codes := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                self.send_signal(signal.SIGKILL)
                for child in self.children:
                    child.wait()
                self._join()
                raise TimeoutError(f"{self.command} did not finish within {timeout} s")
            time.sleep(0.05)
        self._join()
        return codes

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=5)

    def status(self) -> int:
        """The launcher's exit status: the first failure's, else 0 (call after `wait`)."""
        return self.first_failure[1] if self.first_failure else 0

    def text(self, index: int) -> str:
        return "".join(self.lines[index])


def launch_local(command: Sequence[str], processes: int, devices_per_process: Optional[int] = None,
                 port: Optional[int] = None, stop_timeout: float = STOP_TIMEOUT_S) -> int:
    """Runs the children to the end, passing SIGTERM / SIGINT on to them as SIGTERM; returns the exit status."""
    run = LocalRun(command, processes, devices_per_process, port=port, stop_timeout=stop_timeout)
    previous, received = {}, []

    def forward(signum, frame):
        del frame
        received.append(signum)
        # SIGTERM is what makes training save and stop (a SIGINT would interrupt it unsaved);
        # a second Ctrl-C means "now": SIGKILL.
        run.send_signal(signal.SIGKILL if received.count(signal.SIGINT) > 1 else signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, forward)
    try:
        run.start()
        run.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return run.status()
