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

OVERRIDE_PREFIX = "--config."


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Runs `get_config()` of the Python config file at `path`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"glm_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config() function")
    return module.get_config()


def _parse_value(text: str, current):
    """Parses `text` into the type of the value it replaces."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
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
            raise ValueError(f"unrecognised config override {item!r}; expected --config.<path>=<value>")
        body = item[len(OVERRIDE_PREFIX):]
        if "=" in body:
            path, text = body.split("=", 1)
        else:
            if i + 1 >= len(items):
                raise ValueError(f"config override {item!r} has no value")
            path, text = body, items[i + 1]
            i += 1
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            if name not in node:
                raise KeyError(f"config has no field {path!r} (no {name!r})")
            node = node[name]
        if leaf not in node:
            raise KeyError(f"config has no field {path!r}")
        with node.unlocked():
            node[leaf] = _parse_value(text, node[leaf])
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
