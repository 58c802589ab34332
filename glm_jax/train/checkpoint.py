"""Training checkpoints: orbax `CheckpointManager` in `WORKDIR/checkpoints/<step>/`.

Items of one step:
    params      float32 parameters, nested dict, each host writing its own shards
    opt_state   the optimizer state (same sharding as the parameters)
    data        the training reader's position, `reader.state()`: a global position (any process
                count resumes it; glm_jax/data/shards.py), written by process 0
    meta        {"step", "model": GLMConfig fields, "mesh", "batch_size", "accumulation_steps"}
    glm_jax_digest.json  size and CRC32 of every file of the step (DIGEST_FILE)
Next to them: `WORKDIR/glm_config.json` (the model, what `load_model_from_workdir` and
`glm-jax forward/embed --checkpoint WORKDIR` build) and `WORKDIR/config.json` (the whole run).

Complete steps: orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>`
once every host has written its part (on a local or network filesystem; `commit_success.txt` on
GCS), so a step that a killed host left unfinished is never listed. Process 0 writes the digest
into the temporary directory just before the rename: it is part of the atomic commit.

Faults: `latest_step()` is the newest step whose files match its digest; a corrupted or truncated
newer step is moved to `WORKDIR/corrupt_checkpoints/` with one warning line. A save that fails
(a full disk) surfaces, at the next save or at `wait()`, as one `CheckpointSaveError` naming the
step; the steps before it stay (orbax deletes old steps only after a new one is complete).

Saves are asynchronous (the device-to-host copy blocks, the writes do not) and the newest
`keep` steps are kept. Restoring takes the *current* run's shardings, so a checkpoint written
on one mesh, by any number of processes, loads on any other mesh and process count.
"""
from __future__ import annotations

import errno
import json
import logging
import pathlib
import sys
import time
import zlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from glm_jax import files
from glm_jax.model import checkpoint
from glm_jax.errors import CheckpointError, first_line
from glm_jax.model.glm import GLM, GLMConfig, abstract_params

CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG_FILE = "config.json"
DIGEST_FILE = "glm_jax_digest.json"
CORRUPT_DIR = "corrupt_checkpoints"   # WORKDIR/corrupt_checkpoints/<step>-<unix time>: set aside, never read
INFERENCE_ITEMS = ("params", "meta")  # what forward / embed / infer read of a step
DIGEST_CHUNK_BYTES = 8 << 20
# GLMConfig fields that change parameter shapes or what the parameters mean.
ARCHITECTURE_FIELDS = ("emb_dim", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                       "max_position_embeddings", "position_embedding_type", "type_vocab_size", "num_pc",
                       "num_pred")


class CheckpointMismatchError(CheckpointError):
    """A checkpoint that does not fit the current config (architecture, shapes or optimizer)."""


class CheckpointCorruptError(CheckpointError):
    """A complete step whose files are not those written (truncated, overwritten, missing)."""


class CheckpointSaveError(CheckpointError):
    """A save that could not be completed (a full disk, ...); the steps before it are intact."""


def check_workdir_architecture(workdir: str | pathlib.Path, model_config: GLMConfig) -> None:
    """Refuses a workdir whose checkpoints belong to another architecture (its glm_config.json);
    a workdir without checkpoints (a run that failed at its start) is never refused."""
    workdir = pathlib.Path(workdir)
    path = workdir / checkpoint.CONFIG_FILE
    has_checkpoints = (workdir / CHECKPOINT_DIR).is_dir() and any((workdir / CHECKPOINT_DIR).iterdir())
    if path.is_file() and has_checkpoints:
        _check_architecture(json.loads(path.read_text()), model_config, f"{workdir} (glm_config.json)")


def write_run_config(workdir: str | pathlib.Path, model_config: GLMConfig, run_config: Any) -> None:
    """Writes glm_config.json and config.json; the caller has run `check_workdir_architecture` (before
    opening its data, so that bad data leaves no workdir behind)."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name, text in ((checkpoint.CONFIG_FILE, json.dumps(model_config.to_dict(), indent=2)),
                       (RUN_CONFIG_FILE, run_config.to_json_best_effort(indent=2))):
        files.write_text_atomic(workdir / name, text)


def _check_architecture(saved: dict, config: GLMConfig, source: str) -> None:
    current = config.to_dict()
    differing = {k: (saved.get(k), current[k]) for k in ARCHITECTURE_FIELDS if saved.get(k) != current[k]}
    if differing:
        details = ", ".join(f"{k}: saved {s!r} vs config {c!r}" for k, (s, c) in differing.items())
        raise CheckpointMismatchError(
            f"{source} holds a model of another architecture ({details}). Resume with the config it was "
            f"trained with, or start the run in a new workdir.")


# --- integrity: a digest of every file, written with the step ------------------------------------

def _digest_files(step_dir: pathlib.Path, items: Optional[tuple[str, ...]] = None) -> dict[str, list[int]]:
    """{path relative to step_dir: [size, crc32]} of the files of the step's items (of `items` only,
    when given). The step's own top-level files are orbax's, rewritten at the commit after the digest."""
    digests = {}
    for path in sorted(step_dir.rglob("*")):
        relative = path.relative_to(step_dir).as_posix()
        if "/" not in relative or not path.is_file() or (items and relative.split("/")[0] not in items):
            continue
        crc = 0
        with open(path, "rb") as f:
            while chunk := f.read(DIGEST_CHUNK_BYTES):
                crc = zlib.crc32(chunk, crc)
        digests[relative] = [path.stat().st_size, crc]
    return digests


def write_digest(step_dir: pathlib.Path) -> None:
    files.write_text_atomic(step_dir / DIGEST_FILE, json.dumps({"format": 1, "files": _digest_files(step_dir)}))


def step_problem(step_dir: pathlib.Path, items: Optional[tuple[str, ...]] = None) -> Optional[str]:
    """What is wrong with a complete step's files (None: they match the digest written with the step).

    A step without a digest (written by glm-jax before digests) is checked only for readable
    JSON items. `items`: check only these items' files (inference needs "params" and "meta")."""
    try:
        recorded = json.loads((step_dir / DIGEST_FILE).read_text())["files"]
    except FileNotFoundError:
        for item in ("meta", "data"):
            try:
                json.loads((step_dir / item / "metadata").read_text())
            except (OSError, ValueError) as error:
                return f"{item}/metadata: {type(error).__name__}"
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{DIGEST_FILE} unreadable ({type(error).__name__})"
    try:
        actual = _digest_files(step_dir, items)
    except OSError as error:  # e.g. another process moved the step aside while this one read it
        return f"unreadable ({type(error).__name__}: {error.filename})"
    for relative, (size, crc) in recorded.items():
        if items and relative.split("/")[0] not in items:
            continue
        if relative not in actual:
            return f"{relative} missing"
        if actual[relative][0] != size:
            return f"{relative} has {actual[relative][0]} bytes, {size} were written"
        if actual[relative][1] != crc:
            return f"{relative} differs from what was written (CRC32)"
    return None


def _is_disk_full(error: BaseException) -> bool:
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or any(
        text in str(error) for text in ("No space left on device", "RESOURCE_EXHAUSTED", "Disk quota exceeded"))


class _QuietOrbaxErrors(logging.Filter):
    """Drops orbax's ERROR tracebacks of a failed background save while a `TrainCheckpointer` has one
    in flight: the failure reaches the caller as one `CheckpointSaveError` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname and _SAVES_IN_FLIGHT[0] > 0)


_SAVES_IN_FLIGHT = [0]
logging.getLogger("absl").addFilter(_QuietOrbaxErrors())


class TrainCheckpointer:
    """Saves and restores training state in `WORKDIR/checkpoints`, keeping the newest `keep`.

    read_only: for inference next to a running training (no directory created, no temporary
    directories cleaned, corrupt steps skipped but not moved)."""

    def __init__(self, workdir: str | pathlib.Path, keep: int, *, async_save: bool = True, read_only: bool = False):
        self.workdir = pathlib.Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINT_DIR
        self.read_only = read_only
        self._pending: Optional[int] = None   # the step being written in the background
        self._closed = False
        self._problems: dict[tuple[int, Optional[tuple]], Optional[str]] = {}  # verification cache
        self._latest: dict[Optional[tuple], Optional[int]] = {}
        options = ocp.CheckpointManagerOptions(
            # not orbax's read_only, which logs three warnings: a read-only user simply never saves
            max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._digest_pending) if async_save else None)
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._async = async_save
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def _digest_pending(self) -> None:
        """orbax's post-finalization callback (process 0, every host done, before the rename)."""
        temporary = sorted(self.directory.glob(f"{self._pending}.orbax-checkpoint-tmp*"))
        write_digest(temporary[-1] if temporary else self.directory / str(self._pending))

    def all_steps(self) -> list[int]:
        """Complete steps (finalized by orbax), oldest first; not yet checked against their digest."""
        return sorted(self._manager.all_steps())

    def latest_step(self, items: Optional[tuple[str, ...]] = None) -> Optional[int]:
        """The newest complete step whose files match their digest (None: no checkpoint).

        Newer steps that do not match are reported in one warning line (process 0) and, unless
        read-only, moved to WORKDIR/corrupt_checkpoints/. Raises `CheckpointCorruptError` when
        every step is corrupt. `items`: check only these items (e.g. ("params", "meta"))."""
        if items in self._latest:
            return self._latest[items]
        bad = []
        for step in reversed(self.all_steps()):
            problem = self.problem(step, items)
            if problem is None:
                break
            bad.append((step, problem))
        else:
            step = None
        if bad:
            self._set_aside(bad, step)
        self._latest[items] = step
        return step

    def problem(self, step: int, items: Optional[tuple[str, ...]] = None) -> Optional[str]:
        """What is wrong with complete step `step` on disk (None: nothing; cached)."""
        key = (step, items)
        if key not in self._problems:
            self._problems[key] = step_problem(self.directory / str(step), items)
        return self._problems[key]

    def _set_aside(self, bad: list[tuple[int, str]], good: Optional[int]) -> None:
        names = ", ".join(f"step {step} ({problem})" for step, problem in bad)
        if good is None:
            raise CheckpointCorruptError(f"every checkpoint in {self.directory} is corrupt or truncated ({names}); "
                                         "restore a copy or start the run in a new workdir")
        moved = ""
        if not self.read_only:
            if jax.process_index() == 0:
                target = self.workdir / CORRUPT_DIR
                target.mkdir(exist_ok=True)
                for step, _ in bad:
                    (self.directory / str(step)).rename(target / f"{step}-{int(time.time())}")
            if jax.process_count() > 1:  # every host found the same steps bad: agree before re-listing
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("glm_jax_corrupt_checkpoints")
            self._manager.reload()
            moved = f"; moved to {self.workdir / CORRUPT_DIR}"
        if jax.process_index() == 0:
            print(f"glm-jax: warning: corrupt or truncated checkpoint in {self.directory}: {names}{moved}; "
                  f"using step {good}",
                  file=sys.stderr, flush=True)

    def save(self, step: int, params, opt_state, data_state: dict, meta: dict) -> None:
        """Starts an asynchronous save of `step` (returns once the arrays are copied to host).

        A previous save that failed raises `CheckpointSaveError` here (or in `wait()`)."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        self.wait()
        self._pending = step
        _SAVES_IN_FLIGHT[0] += 1
        try:
            self._manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave({**meta, "step": step})), force=True)
            if not self._async and jax.process_index() == 0:
                write_digest(self.directory / str(step))
        except Exception as error:
            self._finish_pending(error)
        self._latest.clear()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk; raises `CheckpointSaveError` for one
        that failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            self._finish_pending(error)
        self._finish_pending(None)

    def _finish_pending(self, error: Optional[BaseException]) -> None:
        step, self._pending = self._pending, None
        if error is not None:
            self.close()  # stop orbax's threads: this checkpointer is done, the error ends the run
        if step is not None:
            _SAVES_IN_FLIGHT[0] -= 1
        if error is None:
            return
        intact = sorted(int(d.name) for d in self.directory.iterdir() if d.name.isdigit() and d.name != str(step))
        reason = "the disk is full" if _is_disk_full(error) else first_line(error)
        raise CheckpointSaveError(
            f"checkpoint step {step} could not be written to {self.directory}: {reason}; the complete checkpoints "
            f"before it are intact (steps {intact}): free space or move the workdir, then rerun the same command "
            "to resume") from error

    def check_compatible(self, step: int, model_config: GLMConfig, params_target) -> dict:
        """Returns the step's meta; raises `CheckpointMismatchError` naming what differs."""
        source = f"checkpoint {self.directory / str(step)}"
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        _check_architecture(meta["model"], model_config, source)
        saved = self._manager.item_metadata(step)["params"].tree
        problems = checkpoint.shape_mismatches(jax.tree.map(np.shape, params_target), jax.tree.map(
            lambda m: m.shape, saved, is_leaf=lambda x: hasattr(x, "shape")))
        if problems:
            raise CheckpointMismatchError(f"{source} does not fit this config's parameters: " + "; ".join(problems[:10]))
        return meta

    def _check_readable(self, step: int, items: Optional[tuple[str, ...]]) -> None:
        if step not in self.all_steps():
            raise FileNotFoundError(f"no training checkpoint {step} in {self.directory} (complete steps: "
                                    f"{self.all_steps()})")
        problem = self.problem(step, items)
        if problem is not None:
            raise CheckpointCorruptError(f"checkpoint {self.directory / str(step)} is corrupt or truncated: {problem}")

    def restore(self, step: int, model_config: GLMConfig, params_target, opt_state_target):
        """Restores `step` into the targets' shardings (pytrees of ShapeDtypeStruct with
        `.sharding`). Returns (params, opt_state, data_state, meta)."""
        self._check_readable(step, None)
        meta = self.check_compatible(step, model_config, params_target)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params_target), opt_state=ocp.args.StandardRestore(opt_state_target),
                data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)}: the optimizer state does not fit this config's "
                f"optimizer (changed optimizer.grad_clip_*, weight_decay or eps_after_bias_correction?): {error}"
            ) from error
        return restored["params"], restored["opt_state"], restored["data"], meta

    def restore_params(self, step: int, model_config: GLMConfig, params_target) -> dict:
        """Only the parameters of `step` (for inference), into `params_target`'s shardings."""
        self._check_readable(step, INFERENCE_ITEMS)
        self.check_compatible(step, model_config, params_target)
        return self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params_target)))["params"]

    def close(self) -> None:
        """Waits for the pending save (raising its error) and stops orbax's threads; idempotent."""
        if self._closed:
            return
        if self._pending is not None:
            self.wait()
        self._closed = True
        try:
            self._manager.close()
        except Exception:  # a failed save's error again: it was raised (or is being raised) by wait()
            pass


def load_model_from_workdir(workdir: str | pathlib.Path, step: Optional[int] = None, **config_changes) -> GLM:
    """The model of a training workdir at `step` (default: the newest intact checkpoint), on one
    device of this process, whatever the number of processes and the mesh that wrote it.

    `config_changes` may change numerics (compute_dtype, scan_layers, ...) but not shapes.
    """
    workdir = pathlib.Path(workdir).absolute()
    config = checkpoint.read_model_config(workdir).replace(**config_changes)
    checkpointer = TrainCheckpointer(workdir, keep=1, async_save=False, read_only=True)
    try:
        step = checkpointer.latest_step(INFERENCE_ITEMS) if step is None else step
        if step is None:
            raise FileNotFoundError(f"no training checkpoint in {checkpointer.directory}")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = abstract_params(config, jax.tree.map(lambda _: device, abstract_params(config)))
        params = checkpointer.restore_params(step, config, target)
    finally:
        checkpointer.close()
    return checkpoint.model_from_params(config, params, source=f"{workdir} step {step}")

