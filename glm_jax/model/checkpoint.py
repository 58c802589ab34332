"""Model checkpoints: orbax-saved parameters plus the `GLMConfig` that built them.

Layout of a model directory:
    glm_config.json   GLMConfig fields (architecture + numerics)
    params/           orbax StandardCheckpointer tree of float32 parameters (nested dict)

Orbax writes into a temporary directory and renames it when complete, so a crash never leaves a
half-written `params/` behind.
"""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from glm_jax import files
from glm_jax.errors import CheckpointError
from glm_jax.model.glm import GLM, GLMConfig, abstract_model

CONFIG_FILE = "glm_config.json"
PARAMS_DIR = "params"


def params_as_dict(model: GLM) -> dict:
    """Nested {name: array} of the model's parameters (the checkpoint and conversion layout)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _shape(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def shape_mismatches(expected: dict, given: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested parameter dicts (names and shapes)."""
    problems = []
    for key in sorted(set(expected) | set(given), key=str):
        name = f"{prefix}{key}"
        if key not in given:
            problems.append(f"missing {name}")
        elif key not in expected:
            problems.append(f"unexpected {name}")
        elif isinstance(expected[key], dict) or isinstance(given[key], dict):
            if not (isinstance(expected[key], dict) and isinstance(given[key], dict)):
                problems.append(f"structure of {name} differs")
            else:
                problems += shape_mismatches(expected[key], given[key], name + ".")
        elif _shape(expected[key]) != _shape(given[key]):
            problems.append(f"{name}: expected shape {_shape(expected[key])}, got {_shape(given[key])}")
    return problems


def model_from_params(config: GLMConfig, params: dict, source: str = "parameters") -> GLM:
    """A model of `config` holding `params`, refusing any name or shape mismatch.

    The model is built abstractly (no random initialisation), then filled with `params`.
    """
    graphdef, state = nnx.split(abstract_model(config))
    problems = shape_mismatches(nnx.to_pure_dict(state), params)
    if problems:
        raise CheckpointError(f"{source} do not fit a model of this config ({len(problems)} problems): "
                              + "; ".join(problems[:20]))
    dtype = np.dtype(config.param_dtype)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jax.numpy.asarray(x, dtype), params))
    return nnx.merge(graphdef, state)


def save_model(directory: str | pathlib.Path, model: GLM, *, overwrite: bool = False) -> pathlib.Path:
    """Writes `model` (config + parameters) to `directory`."""
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    params_path = directory / PARAMS_DIR
    if params_path.exists() and not overwrite:
        raise FileExistsError(f"{params_path} exists; pass overwrite=True to replace it")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_path, jax.tree.map(np.asarray, params_as_dict(model)), force=overwrite)
    checkpointer.wait_until_finished()
    files.write_text_atomic(directory / CONFIG_FILE, json.dumps(model.config.to_dict(), indent=2))
    return directory


def read_model_config(directory: str | pathlib.Path) -> GLMConfig:
    """The GLMConfig saved in a model directory or training workdir (`glm_config.json`)."""
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a glm-jax model directory")
    return GLMConfig.from_dict(json.loads(path.read_text()))


def load_model(directory: str | pathlib.Path, **config_changes) -> GLM:
    """Loads a model directory written by `save_model`. `config_changes` may change numerics
    (e.g. compute_dtype="bfloat16", scan_layers=False) but not shapes."""
    directory = pathlib.Path(directory).absolute()
    config = read_model_config(directory).replace(**config_changes)
    params_path = directory / PARAMS_DIR
    if not params_path.exists():
        raise FileNotFoundError(f"{params_path} not found")
    restored = ocp.StandardCheckpointer().restore(params_path)
    return model_from_params(config, restored, source=f"checkpoint {params_path}")
