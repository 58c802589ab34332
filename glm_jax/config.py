"""Config files and command-line overrides.

Configs are Python files in `configs/` whose `get_config()` returns an `ml_collections.ConfigDict`
(the big_vision / flax-examples convention). Any leaf can be overridden from the command line:

    glm-jax train --config configs/glm_base.py --config.model.num_layers=4 --config.train.batch_size=64
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Sequence

import ml_collections

from glm_jax.errors import ConfigError, did_you_mean

OVERRIDE_PREFIX = "--config."


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Runs `get_config()` of the Python config file at `path`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"glm_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    return module.get_config()


def _parse_value(text: str, current):
    """Parses `text` into the type of the value it replaces."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    if isinstance(current, str):
        return text
    if current is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    value = ast.literal_eval(text)
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, (tuple, list)):
        value = type(current)(value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` (or `--config.a.b value`) overrides in order."""
    items = list(overrides)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith(OVERRIDE_PREFIX):
            raise ConfigError(f"unrecognised config override {item!r}; expected --config.<path>=<value>")
        body = item[len(OVERRIDE_PREFIX):]
        if "=" in body:
            path, text = body.split("=", 1)
        else:
            if i + 1 >= len(items):
                raise ConfigError(f"config override {item!r} has no value")
            path, text = body, items[i + 1]
            i += 1
        names = path.split(".")
        group, value = None, config
        for depth, name in enumerate(names):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"--config.{path}: config.{'.'.join(names[:depth])} is a value, not a group")
            if name not in value:
                prefix = ".".join(names[:depth] + [""])
                raise ConfigError(f"--config.{path}: the config has no field {prefix + name!r}"
                                  + did_you_mean(name, value.keys(), prefix))
            group, value = value, value[name]
        try:
            parsed = _parse_value(text, value)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--config.{path}: expected a {type(value).__name__} (a Python literal), "
                              f"got {text!r}") from None
        with group.unlocked():
            group[names[-1]] = parsed
        i += 1
    return config


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.x=y` overrides (and their values) from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(OVERRIDE_PREFIX):
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                overrides.append(argv[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads a config file and applies command-line overrides to it."""
    return apply_overrides(load_config_file(path), overrides)


def default_config() -> ml_collections.ConfigDict:
    """The package defaults: gLM exactly as the original `train.py` builds and trains it.

    `config.model` holds every `GLMConfig` field at its default (documented on the dataclass, never
    re-listed here); the other blocks are the original's objective, optimiser and training run.
    Config files start from this and change only what differs.
    """
    from glm_jax.model.glm import GLMConfig

    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(GLMConfig().to_dict())

    config.objective = ml_collections.ConfigDict()
    config.objective.mask_prob = 0.15          # each real gene, independently; padding never
    config.objective.mask_value = -1.0         # a masked gene's whole input row
    config.objective.label_clip = 10.0         # labels clipped to +-label_clip before the loss
    config.objective.prob_loss_weight = 1e-4   # loss = MSE(closest hypothesis) + weight * CE
    # "all_positions": the original's MSE/CE means over every position, unmasked ones zeroed.
    # "masked_genes": means over masked genes only (loss scale independent of the mask rate).
    config.objective.reduction = "all_positions"

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-4
    config.optimizer.schedule = "warmup_constant"  # | "warmup_cosine" | "warmup_linear"
    config.optimizer.warmup_steps = 5000
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-6
    config.optimizer.weight_decay = 0.0
    # False: transformers.AdamW, the original's (eps added to sqrt(v) before bias correction);
    # True: optax / torch.optim.AdamW (eps after bias correction).
    config.optimizer.eps_after_bias_correction = False
    # The original calls clip_grad_value_ after optimizer.step(): it never changes an update.
    config.optimizer.grad_clip_norm = 0.0   # > 0: clip by global norm before the update
    config.optimizer.grad_clip_value = 0.0  # > 0: clip each gradient element before the update

    config.train = ml_collections.ConfigDict()
    config.train.seed = 0
    config.train.batch_size = 1000          # contigs per optimizer step (global)
    config.train.accumulation_steps = 1     # microbatches per step (lax.scan inside the step)
    config.train.num_steps = 1_296_960      # the paper's run
    config.train.log_every = 100
    config.train.eval_every = 10_000
    config.train.eval_batches = 10
    config.train.checkpoint_every = 10_000
    config.train.keep_checkpoints = 3

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1                   # -1: all devices not used by the other axes
    config.mesh.fsdp = 1
    config.mesh.tensor = 1

    config.data = ml_collections.ConfigDict()
    config.data.train_pattern = ""          # make-shards output dir, TFRecord glob, or an .npz of windows
    config.data.eval_pattern = ""
    config.data.shuffle_buffer = 10_000
    return config
