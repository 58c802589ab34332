"""Reading and writing PyTorch-style state dicts as numpy arrays: the one reader of glm-jax.

Used for the original gLM checkpoints (`interop/convert.py`) and for ESM2 weights
(`proteins/esm2.py`). Formats: `.safetensors`, a sharded checkpoint's `*.index.json`, and PyTorch
`.bin`/`.pt`/`.pth` read with `torch.load(weights_only=True)`, so nothing is unpickled as code.
A training checkpoint holding `{'model_state_dict': ...}` is unwrapped.
"""
from __future__ import annotations

import json
import pathlib
from typing import Mapping

import numpy as np

from glm_jax import files
from glm_jax.errors import CheckpointError


class StateDictError(CheckpointError):
    """A file that is not a readable state dict, or a tensor missing or of the wrong shape."""


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """{tensor name: numpy array} of the file at `path` (floating tensors as float32)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state dict not found: {path}")
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as error:
            raise StateDictError(f"{path}: not a sharded-checkpoint index (no weight_map): {error}") from None
        return {k: v for shard in shards for k, v in read_state_dict(path.parent / shard).items()}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            loaded = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise StateDictError(f"cannot read {path} as safetensors: {error}") from None
        return {name: _as_float32(array) for name, array in loaded.items()}
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs PyTorch (pip install 'glm-jax[torch]'); "
                          ".safetensors files do not") from None
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt, truncated or code-carrying pickles
        detail = " ".join(str(error).split())[:200]
        raise StateDictError(f"cannot read {path} as a weights-only PyTorch state dict: {detail}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("model_state_dict"), dict):
        loaded = loaded["model_state_dict"]
    if not isinstance(loaded, dict) or not loaded:
        raise StateDictError(f"{path} holds a {type(loaded).__name__}{' (empty)' if loaded == {} else ''}, "
                             "not a state dict of tensors")
    tensors = {name: value for name, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise StateDictError(f"{path}: a dict without tensors, not a state dict")
    return {name: _as_float32(t.detach().float().numpy() if t.is_floating_point() else t.numpy())
            for name, t in tensors.items()}


def _as_float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def write_state_dict(path: str | pathlib.Path, state_dict: Mapping[str, np.ndarray]) -> pathlib.Path:
    """Writes `.safetensors` (no torch needed) or `.bin`/`.pt` (torch.save), atomically."""
    path = pathlib.Path(path)
    with files.atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file
            save_file({name: np.ascontiguousarray(t) for name, t in state_dict.items()}, str(tmp))
        else:
            import torch
            torch.save({name: torch.from_numpy(np.array(t)) for name, t in state_dict.items()}, tmp)
    return path


def tensor_shape(state_dict: Mapping[str, np.ndarray], name: str, model: str) -> tuple[int, ...]:
    """Shape of tensor `name`, or StateDictError saying the file is not a `model` checkpoint."""
    if name not in state_dict:
        raise StateDictError(f"state dict has no tensor {name!r}: not {model} checkpoint")
    return tuple(np.shape(state_dict[name]))
