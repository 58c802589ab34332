"""Training checkpoints: orbax `CheckpointManager` in `WORKDIR/checkpoints/<step>/`.

Items of one step (orbax writes into a temporary directory and renames it when complete, so
a killed run leaves no half-written step behind):
    params      float32 parameters, nested dict, each host writing its own shards
    opt_state   the optimizer state (same sharding as the parameters)
    data        the training reader's position, `reader.state()` (process 0's; every host has
                consumed the same number of windows, only `process_index` differs)
    meta        {"step", "model": GLMConfig fields, "mesh", "batch_size", "accumulation_steps"}
Next to them: `WORKDIR/glm_config.json` (the model, what `load_model_from_workdir` and
`glm-jax forward/embed --checkpoint WORKDIR` build) and `WORKDIR/config.json` (the whole run).

Saves are asynchronous (the device-to-host copy blocks, the writes do not) and the newest
`keep` steps are kept. Restoring takes the *current* run's shardings, so a checkpoint written
on one mesh loads on any other.
"""
from __future__ import annotations

import json
import pathlib
import signal
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from glm_jax import files
from glm_jax.model import checkpoint
from glm_jax.errors import CheckpointError
from glm_jax.model.glm import GLM, GLMConfig, abstract_params

CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG_FILE = "config.json"
# GLMConfig fields that change parameter shapes or what the parameters mean.
ARCHITECTURE_FIELDS = ("emb_dim", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                       "max_position_embeddings", "position_embedding_type", "type_vocab_size", "num_pc",
                       "num_pred")


class CheckpointMismatchError(CheckpointError):
    """A checkpoint that does not fit the current config (architecture, shapes or optimizer)."""


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


class TrainCheckpointer:
    """Saves and restores training state in `WORKDIR/checkpoints`, keeping the newest `keep`."""

    def __init__(self, workdir: str | pathlib.Path, keep: int, *, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, params, opt_state, data_state: dict, meta: dict) -> None:
        """Starts an asynchronous save of `step` (returns once the arrays are copied to host)."""
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave({**meta, "step": step})), force=True)

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

    def restore(self, step: int, model_config: GLMConfig, params_target, opt_state_target):
        """Restores `step` into the targets' shardings (pytrees of ShapeDtypeStruct with
        `.sharding`). Returns (params, opt_state, data_state, meta)."""
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
        self.check_compatible(step, model_config, params_target)
        return self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params_target)))["params"]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def load_model_from_workdir(workdir: str | pathlib.Path, step: Optional[int] = None, **config_changes) -> GLM:
    """The model of a training workdir at `step` (default: the newest checkpoint), on one device.

    `config_changes` may change numerics (compute_dtype, scan_layers, ...) but not shapes.
    """
    workdir = pathlib.Path(workdir).absolute()
    config = checkpoint.read_model_config(workdir).replace(**config_changes)
    checkpointer = TrainCheckpointer(workdir, keep=1, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.all_steps():
            raise FileNotFoundError(f"no training checkpoint {'' if step is None else step} in {checkpointer.directory}"
                                    f" (steps: {checkpointer.all_steps()})")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = abstract_params(config, jax.tree.map(lambda _: device, abstract_params(config)))
        params = checkpointer.restore_params(step, config, target)
    finally:
        checkpointer.close()
    return checkpoint.model_from_params(config, params, source=f"{workdir} step {step}")


class PreemptionGuard:
    """Turns SIGTERM (what SLURM, Kubernetes and TPU maintenance send before a kill) into a
    flag the training loop polls, so it can save a final checkpoint and exit cleanly.

    Use as a context manager; the previous handler is restored on exit. `requested()` agrees
    across hosts (any host signalled -> all stop at the same step), which costs an all-gather,
    so multi-host loops call it every few steps only.
    """

    def __init__(self):
        self._signalled = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        del signum, frame
        self._signalled = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._signalled
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self._signalled))))
