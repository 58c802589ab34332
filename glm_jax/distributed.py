"""Several JAX processes as one run: where the cluster is, and starting JAX's distributed runtime.

    from glm_jax import distributed
    distributed.initialize()          # before anything touches jax devices
    if distributed.is_primary(): ...  # process 0 writes logs
    distributed.barrier("name")       # every process waits here (no-op with one process)

Where the processes come from, first match wins:
  1. explicit arguments (`--coordinator HOST:PORT --num-processes N --process-id I`), then the
     environment GLM_JAX_COORDINATOR / GLM_JAX_NUM_PROCESSES / GLM_JAX_PROCESS_ID (what
     `glm-jax launch-local` sets); all three are needed;
  2. SLURM (SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NODELIST): the
     coordinator is the step's first node on port SLURM_JOB_ID % 4096 + 61440 (JAX's rule;
     JAX_COORDINATOR_PORT overrides it), so every task computes the same address;
  3. another environment JAX detects itself (Cloud TPU VMs and pods, GKE, Open MPI).
Nothing found: `DistributedError`, before any waiting.

GPUs under SLURM: JAX's own SLURM detection makes each task see one GPU (its SLURM_LOCALID),
which breaks the usual one-task-per-node launch with 8 GPUs. Here a task sees every GPU it is
given: JAX_LOCAL_DEVICE_IDS when set; else the GPUs visible to it (CUDA_VISIBLE_DEVICES, or the
node's /dev/nvidiaN), split evenly between the node's tasks unless SLURM already bound GPUs per
task (--gpus-per-task). Without GPUs nothing is restricted.

Timeouts (seconds, environment overrides): connecting waits at most GLM_JAX_INIT_TIMEOUT (60)
for the coordinator and every process; a process whose heartbeats stop for
GLM_JAX_HEARTBEAT_TIMEOUT (30) is declared dead and the others stop with an error instead of
waiting on a collective; shutting down waits at most GLM_JAX_SHUTDOWN_TIMEOUT (30) for peers
(on CPU a collective with a dead peer fails at once, so that is how long a survivor lingers).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import signal
from typing import Mapping, Optional

from glm_jax.errors import DistributedError

ENV_COORDINATOR = "GLM_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "GLM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "GLM_JAX_PROCESS_ID"
ENV_INIT_TIMEOUT = "GLM_JAX_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "GLM_JAX_HEARTBEAT_TIMEOUT"
ENV_SHUTDOWN_TIMEOUT = "GLM_JAX_SHUTDOWN_TIMEOUT"
DEFAULT_TIMEOUTS = {ENV_INIT_TIMEOUT: 60, ENV_HEARTBEAT_TIMEOUT: 30, ENV_SHUTDOWN_TIMEOUT: 30}
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What `jax.distributed.initialize` is given. None fields are left to JAX's own detection
    (`source == "jax"`: TPU pods and other environments JAX knows)."""

    source: str                              # "explicit", "environment", "slurm" or "jax"
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[tuple[int, ...]] = None


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def _explicit(coordinator, num_processes, process_id, source: str, names: tuple[str, str, str]) -> Cluster:
    given = dict(zip(names, (coordinator, num_processes, process_id)))
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise DistributedError(f"{', '.join(missing)} missing: give all of {', '.join(names)} "
                               "(or none, under SLURM or on a TPU pod)")
    if not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", str(coordinator)):
        raise DistributedError(f"{names[0]} must be HOST:PORT, got {coordinator!r}")
    count, index = _int(num_processes, names[1]), _int(process_id, names[2])
    if count < 1 or not 0 <= index < count:
        raise DistributedError(f"need {names[1]} >= 1 and 0 <= {names[2]} < {names[1]}, got {count} and {index}")
    return Cluster(source, str(coordinator), count, index)


def slurm_coordinator(environ: Mapping[str, str]) -> str:
    """The first host of SLURM_STEP_NODELIST ('node[001-004],x' -> 'node001') : the job's port."""
    port = environ.get("JAX_COORDINATOR_PORT") or str(int(environ["SLURM_JOB_ID"]) % 4096 + 61440)
    nodes = environ["SLURM_STEP_NODELIST"]
    match = re.match(r"([^,\[]+)(?:\[([^,\-\]]+))?", nodes)
    if match is None:
        raise DistributedError(f"cannot read the first host of SLURM_STEP_NODELIST={nodes!r}")
    return f"{match.group(1)}{match.group(2) or ''}:{port}"


def tasks_on_node(environ: Mapping[str, str]) -> int:
    """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE ('2(x3),1') at SLURM_NODEID."""
    text = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or ""
    counts = []
    for part in filter(None, text.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return 1
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(environ.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else 1


def node_gpu_count() -> int:
    """NVIDIA GPUs of this machine (device files; nothing is initialised)."""
    return sum(1 for p in pathlib.Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name))


def local_device_ids(environ: Mapping[str, str], gpu_count: Optional[int] = None) -> Optional[tuple[int, ...]]:
    """The accelerator ids this SLURM task uses (see the module docstring), None for all / no GPUs.

    CUDA numbers the devices of CUDA_VISIBLE_DEVICES from 0, so ids are positions in that list.
    """
    if environ.get("JAX_LOCAL_DEVICE_IDS"):
        return tuple(_int(x, "JAX_LOCAL_DEVICE_IDS") for x in environ["JAX_LOCAL_DEVICE_IDS"].split(","))
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = len([x for x in visible.split(",") if x.strip()])
    else:
        gpus = node_gpu_count() if gpu_count is None else gpu_count
    if gpus == 0:
        return None
    tasks = 1 if environ.get("SLURM_GPUS_PER_TASK") else tasks_on_node(environ)
    if tasks <= 1:
        return tuple(range(gpus))
    per_task = gpus // tasks
    if per_task == 0:
        raise DistributedError(f"{tasks} tasks on this node share {gpus} GPU(s): run at most one task per GPU")
    local = int(environ.get("SLURM_LOCALID", "0"))
    return tuple(range(local * per_task, (local + 1) * per_task))


def detect(coordinator: Optional[str] = None, num_processes: Optional[int] = None, process_id: Optional[int] = None,
           environ: Optional[Mapping[str, str]] = None, gpu_count: Optional[int] = None) -> Cluster:
    """The cluster this process belongs to (pure: reads `environ`, default os.environ)."""
    environ = os.environ if environ is None else environ
    if any(v is not None for v in (coordinator, num_processes, process_id)):
        return _explicit(coordinator, num_processes, process_id, "explicit",
                         ("--coordinator", "--num-processes", "--process-id"))
    names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    if any(environ.get(n) for n in names):
        return _explicit(*(environ.get(n) or None for n in names), "environment", names)
    if all(environ.get(n) for n in SLURM_VARIABLES):
        return Cluster("slurm", slurm_coordinator(environ), _int(environ["SLURM_NTASKS"], "SLURM_NTASKS"),
                       _int(environ["SLURM_PROCID"], "SLURM_PROCID"), local_device_ids(environ, gpu_count))
    if environ.get("SLURM_JOB_ID") and not environ.get("SLURM_STEP_NODELIST"):
        raise DistributedError("inside a SLURM allocation but not in a job step: start the processes with srun "
                               "(srun -n N glm-jax ... --distributed)")
    if _jax_detects_cluster():
        return Cluster("jax")
    raise DistributedError("no cluster found: not under SLURM or on a TPU pod; give --coordinator HOST:PORT "
                           "--num-processes N --process-id I, or start the processes with glm-jax launch-local")


def _jax_detects_cluster() -> bool:
    """Whether one of JAX's cluster environments (TPU VM, GKE, Open MPI, ...) is present."""
    try:
        from jax._src import clusters
        return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types
                   if not env.opt_in_only_method and env.name != "slurm")
    except Exception:  # private API of another jax version: let jax try (it fails on its own)
        return False


def timeout(name: str, environ: Optional[Mapping[str, str]] = None) -> int:
    """One of the DEFAULT_TIMEOUTS (seconds), overridden by its environment variable."""
    environ = os.environ if environ is None else environ
    value = _int(environ.get(name, DEFAULT_TIMEOUTS[name]), name)
    if value < 1:
        raise DistributedError(f"{name} must be >= 1 second, got {value}")
    return value


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def check_coordinator(cluster: Cluster, wait_s: float) -> None:
    """Fails in one line, before JAX is involved, where JAX would abort the process with a C++
    stack trace: a coordinator host that does not resolve, a coordinator port taken on process 0,
    and (other processes) nothing accepting connections at the coordinator for `wait_s` seconds.
    Processes that connect but never all arrive still end in JAX's own fatal error after
    GLM_JAX_INIT_TIMEOUT (bounded, non-zero, not one line)."""
    import socket
    import time
    host, port = _split_address(cluster.coordinator_address)
    where = f"coordinator {cluster.coordinator_address} (process {cluster.process_id} of {cluster.num_processes})"
    try:
        socket.getaddrinfo(host, port)
    except OSError as error:
        raise DistributedError(f"{where}: cannot resolve host {host!r}: {error}") from None
    if cluster.process_id == 0:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            # as gRPC's server does: a port left in TIME_WAIT by the previous run (a requeued job
            # reuses its coordinator port) is free; a port someone listens on still is not
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError as error:
                raise DistributedError(f"{where}: process 0 cannot listen on port {port}: {error.strerror}") from None
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as error:
            if time.monotonic() > deadline:
                raise DistributedError(f"{where} cannot be reached within {wait_s:g} s ({ENV_INIT_TIMEOUT}): "
                                       f"{error.strerror or error}; is process 0 running?") from None
            time.sleep(0.5)


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
    """Joins this process to the run (see the module docstring); call before any jax computation.

    Raises DistributedError (one line) when no cluster is found or the coordinator cannot be
    reached within GLM_JAX_INIT_TIMEOUT seconds (`check_coordinator`). When the coordinator is up
    but not every process arrives, JAX ends the process itself (SIGABRT, a C++ log) after about
    twice GLM_JAX_INIT_TIMEOUT; a peer that dies later ends the others after
    GLM_JAX_HEARTBEAT_TIMEOUT (JAX's coordination service), never a hang on a collective.
    """
    import jax
    cluster = detect(coordinator, num_processes, process_id)
    timeouts = {name: timeout(name) for name in DEFAULT_TIMEOUTS}
    try:  # cross-process collectives on CPU (gloo is the default since jax 0.5; older default: none)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:
        pass
    explicit = cluster.source != "jax"
    if explicit:
        check_coordinator(cluster, timeouts[ENV_INIT_TIMEOUT])
    where = (f"coordinator {cluster.coordinator_address} (process {cluster.process_id} of {cluster.num_processes}, "
             f"from {cluster.source})" if explicit else "the cluster JAX detected")
    try:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator_address, num_processes=cluster.num_processes,
            process_id=cluster.process_id,
            local_device_ids=list(cluster.local_device_ids) if cluster.local_device_ids else None,
            # our values are complete: JAX's SLURM detection would otherwise restrict GPUs to [SLURM_LOCALID]
            cluster_detection_method="deactivate" if explicit else None,
            initialization_timeout=timeouts[ENV_INIT_TIMEOUT],
            heartbeat_timeout_seconds=timeouts[ENV_HEARTBEAT_TIMEOUT],
            shutdown_timeout_seconds=timeouts[ENV_SHUTDOWN_TIMEOUT])
    except DistributedError:
        raise
    except Exception as error:
        from glm_jax.errors import first_line
        raise DistributedError(f"could not join {where} within {timeouts[ENV_INIT_TIMEOUT]} s "
                               f"({ENV_INIT_TIMEOUT}): {first_line(error)}") from None
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # Measured with jax 0.10.2: CPU programs with gloo collectives loaded from the persistent
        # compilation cache hang at their first collective ("Gloo context initialization failed:
        # GetKeyValue() timed out"), so several CPU processes always compile.
        jax.config.update("jax_enable_compilation_cache", False)


def is_initialized() -> bool:
    import jax
    try:
        return jax.distributed.is_initialized()
    except AttributeError:  # pragma: no cover - older jax
        return jax.process_count() > 1


def is_primary() -> bool:
    """Process 0: the one that writes logs, metrics and single-writer files."""
    import jax
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all arrive (a no-op with one process). `name` must be
    the same string on every process and distinct between barriers that can be in flight."""
    import jax
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class Preemption:
    """SIGTERM (SLURM's time limit or preemption, TPU maintenance, `glm-jax launch-local`
    forwarding a Ctrl-C) -> the one step at which every process saves a checkpoint and stops.

        with Preemption() as preemption:
            for step in ...:
                ...one step...
                if preemption.reached(step): save(step); break

    One process: a Python SIGTERM handler sets a flag that `reached` returns.
    Several processes: the signal reaches each at a different step, and a save is a collective,
    so they must agree. JAX's preemption sync manager (started by `jax.distributed.initialize`)
    owns SIGTERM in C++: once any process is signalled, the processes agree in the background on
    the step after the largest step any of them has reported, and `reached(step)` turns True at
    that same step on every process. Each call is a local check, no collective per step (the
    all-gather of a flag it replaces cost a device round trip and a host sync every step, so it
    ran only at log steps, a long way from the signal). Where the service is off
    (`jax_enable_preemption_service=False`) an all-gather of the flag every step stands in.
    No Python SIGTERM handler is installed then: it would replace JAX's.
    """

    def __init__(self):
        self._signalled = False
        self._previous = None
        self._sync_manager = False

    def __enter__(self) -> "Preemption":
        import jax
        if jax.process_count() > 1:
            from jax._src import distributed as jax_distributed
            self._sync_manager = getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None
        if not self._sync_manager:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self._signalled = True

    def reached(self, step: int) -> bool:
        """True at the step where every process saves and stops (call it at every step)."""
        import jax
        if self._sync_manager:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        if jax.process_count() == 1:
            return self._signalled
        import numpy as np
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self._signalled))))
