"""Weights both ways between the original PyTorch gLM state dict and glm-jax model directories.

The original `gLM` module holds three RoBERTa stacks (class-hierarchy leftovers, docs/ARCHITECTURE.md
"The original gLM"). Only these keys take part in its forward pass:

    dense.*                                   input projection  [hidden, emb_dim]
    roberta.roberta.embeddings.{token_type_embeddings,LayerNorm}.*
    roberta.roberta.encoder.layer.N.*         the 19 layers (with distance_embedding)
    roberta.lm_head.{dense,dense_prob}.*      hypotheses and their logits

Everything else (`embeddings.*`, `encoder.*`, `pooler.*`, `roberta.{embeddings,encoder,pooler}.*`,
word/absolute-position embeddings, the never-applied `roberta.contact_head.*`, buffers) is
recognised and dropped. Files are read with `torch.load(weights_only=True)` or safetensors:
nothing is ever unpickled as code.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Mapping

import numpy as np

from glm_jax import files
from glm_jax.errors import CheckpointError, ConfigError, first_line
from glm_jax.interop.state_dict import StateDictError, read_state_dict, tensor_shape, write_state_dict
from glm_jax.model import checkpoint
from glm_jax.model.glm import GLMConfig, abstract_params

PREFIX = "roberta.roberta."
LAYER_KEY = re.compile(r"^roberta\.roberta\.encoder\.layer\.(\d+)\.(.+)$")
UNUSED_PREFIXES = (
    "embeddings.", "encoder.", "pooler.",
    "roberta.embeddings.", "roberta.encoder.", "roberta.pooler.", "roberta.contact_head.",
    PREFIX + "embeddings.word_embeddings.", PREFIX + "embeddings.position_embeddings.",
    PREFIX + "pooler.",
)
UNUSED_SUFFIXES = (".position_ids", ".token_type_ids")

# per-layer torch name -> (our stacked name, kind); kinds say how a torch tensor maps to ours.
LAYER_TENSORS = {
    "attention.self.query.weight": ("query_kernel", "qkv_kernel"),
    "attention.self.query.bias": ("query_bias", "qkv_bias"),
    "attention.self.key.weight": ("key_kernel", "qkv_kernel"),
    "attention.self.key.bias": ("key_bias", "qkv_bias"),
    "attention.self.value.weight": ("value_kernel", "qkv_kernel"),
    "attention.self.value.bias": ("value_bias", "qkv_bias"),
    "attention.self.distance_embedding.weight": ("distance_embedding", "copy"),
    "attention.output.dense.weight": ("out_kernel", "out_kernel"),
    "attention.output.dense.bias": ("out_bias", "copy"),
    "attention.output.LayerNorm.weight": ("attention_norm_scale", "copy"),
    "attention.output.LayerNorm.bias": ("attention_norm_bias", "copy"),
    "intermediate.dense.weight": ("mlp_in_kernel", "transpose"),
    "intermediate.dense.bias": ("mlp_in_bias", "copy"),
    "output.dense.weight": ("mlp_out_kernel", "transpose"),
    "output.dense.bias": ("mlp_out_bias", "copy"),
    "output.LayerNorm.weight": ("mlp_norm_scale", "copy"),
    "output.LayerNorm.bias": ("mlp_norm_bias", "copy"),
}
TOP_TENSORS = {
    "dense.weight": ("input_kernel", "transpose"),
    "dense.bias": ("input_bias", "copy"),
    PREFIX + "embeddings.token_type_embeddings.weight": ("token_type_embedding", "copy"),
    PREFIX + "embeddings.LayerNorm.weight": ("embedding_norm_scale", "copy"),
    PREFIX + "embeddings.LayerNorm.bias": ("embedding_norm_bias", "copy"),
    "roberta.lm_head.dense.weight": ("prediction_kernel", "prediction_kernel"),
    "roberta.lm_head.dense.bias": ("prediction_bias", "prediction_bias"),
    "roberta.lm_head.dense_prob.weight": ("logit_kernel", "transpose"),
    "roberta.lm_head.dense_prob.bias": ("logit_bias", "copy"),
}


def _to_ours(kind: str, tensor: np.ndarray, config: GLMConfig) -> np.ndarray:
    """Torch layout -> glm-jax layout for one tensor (nn.Linear weights are [out, in])."""
    H, D, P, C = config.num_heads, config.head_dim, config.num_pred, config.num_pc
    if kind == "copy":
        return tensor
    if kind == "transpose":
        return tensor.T
    if kind == "qkv_kernel":
        return tensor.T.reshape(-1, H, D)
    if kind == "qkv_bias":
        return tensor.reshape(H, D)
    if kind == "out_kernel":
        return tensor.T.reshape(H, D, -1)
    if kind == "prediction_kernel":
        return tensor.T.reshape(-1, P, C)
    if kind == "prediction_bias":
        return tensor.reshape(P, C)
    raise ValueError(kind)


def _to_torch(kind: str, array: np.ndarray) -> np.ndarray:
    """glm-jax layout -> torch layout for one tensor (inverse of `_to_ours`)."""
    if kind == "copy":
        return array
    if kind == "transpose":
        return array.T
    if kind in ("qkv_kernel", "prediction_kernel"):
        return array.reshape(array.shape[0], -1).T
    if kind in ("qkv_bias", "prediction_bias"):
        return array.reshape(-1)
    if kind == "out_kernel":
        return array.reshape(-1, array.shape[-1]).T
    raise ValueError(kind)


def is_unused_key(name: str) -> bool:
    """Keys of the original state dict that its forward pass never reads."""
    return name.startswith(UNUSED_PREFIXES) or name.endswith(UNUSED_SUFFIXES)


def strip_wrappers(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Removes the `module.` prefix that torch.nn.DataParallel adds."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def infer_config(state_dict: Mapping[str, np.ndarray], **overrides) -> GLMConfig:
    """Reads the architecture off the tensor shapes (dropout/eps keep the original defaults).

    relative_key and relative_key_query have the same tensors; the original's relative_key_query
    is assumed unless overridden.
    """
    def shape(name):
        return tensor_shape(state_dict, name, "an original gLM")

    layers = {int(m.group(1)) for m in map(LAYER_KEY.match, state_dict) if m}
    if not layers:
        raise StateDictError(f"state dict has no {PREFIX}encoder.layer.N.* tensors: not an original gLM checkpoint")
    hidden, emb_dim = shape("dense.weight")
    num_distances, head_dim = shape(PREFIX + "encoder.layer.0.attention.self.distance_embedding.weight")
    num_pred = shape("roberta.lm_head.dense_prob.weight")[0]
    values = dict(
        emb_dim=emb_dim, hidden_size=hidden, num_layers=max(layers) + 1, num_heads=hidden // head_dim,
        intermediate_size=shape(PREFIX + "encoder.layer.0.intermediate.dense.weight")[0],
        max_position_embeddings=(num_distances + 1) // 2,
        type_vocab_size=shape(PREFIX + "embeddings.token_type_embeddings.weight")[0],
        num_pred=num_pred, num_pc=shape("roberta.lm_head.dense.weight")[0] // num_pred,
    )
    values["max_genes"] = min(30, values["max_position_embeddings"])
    values.update(overrides)
    return GLMConfig(**values)


def expected_torch_shapes(config: GLMConfig) -> dict[str, tuple[int, ...]]:
    """{original key: shape} of every tensor the original's forward pass reads, for `config`."""
    ours = abstract_params(config)

    def torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return _to_torch(kind, np.broadcast_to(np.float32(0), shape)).shape

    shapes = {name: torch_shape(kind, ours[our_name].shape) for name, (our_name, kind) in TOP_TENSORS.items()}
    for torch_name, (our_name, kind) in LAYER_TENSORS.items():
        layer_shape = torch_shape(kind, ours["encoder"][our_name].shape[1:])
        shapes.update({f"{PREFIX}encoder.layer.{i}.{torch_name}": layer_shape for i in range(config.num_layers)})
    return shapes


def torch_to_params(state_dict: Mapping[str, np.ndarray], config: GLMConfig) -> tuple[dict, list[str]]:
    """Original state dict -> (glm-jax nested params, names of the dropped unused tensors).

    Raises StateDictError naming every missing, unexpected or wrongly shaped tensor.
    """
    state_dict = strip_wrappers(state_dict)
    expected = expected_torch_shapes(config)
    wrong = {name: f"{name} has shape {tuple(np.shape(t))}, expected {expected[name]}"
             for name, t in state_dict.items() if name in expected and tuple(np.shape(t)) != expected[name]}
    params: dict = {"encoder": {}}
    per_layer: dict[str, dict[int, np.ndarray]] = {}
    dropped, unexpected = [], []
    for name, tensor in state_dict.items():
        # A wrongly shaped tensor is reported below, never converted (its reshape could fail).
        converted = None if name in wrong else _to_ours
        layer_match = LAYER_KEY.match(name)
        if name in TOP_TENSORS:
            ours, kind = TOP_TENSORS[name]
            params[ours] = converted and converted(kind, np.asarray(tensor, np.float32), config)
        elif layer_match and layer_match.group(2) in LAYER_TENSORS:
            ours, kind = LAYER_TENSORS[layer_match.group(2)]
            per_layer.setdefault(ours, {})[int(layer_match.group(1))] = (
                converted and converted(kind, np.asarray(tensor, np.float32), config))
        elif is_unused_key(name):
            dropped.append(name)
        else:
            unexpected.append(name)
    missing = [f"{PREFIX}encoder.layer.{i}.{torch_name}"
               for torch_name, (ours, _) in LAYER_TENSORS.items()
               for i in range(config.num_layers) if i not in per_layer.get(ours, {})]
    missing += [name for name, (ours, _) in TOP_TENSORS.items() if ours not in params]
    extra_layers = sorted({i for stack in per_layer.values() for i in stack if i >= config.num_layers})
    problems = [f"missing tensors: {missing}"] if missing else []
    if wrong:
        problems.append("wrong shapes: " + "; ".join(list(wrong.values())[:10]) + (" ..." if len(wrong) > 10 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    if extra_layers:
        problems.append(f"layers {extra_layers} beyond num_layers={config.num_layers}")
    if problems:
        raise StateDictError("state dict does not match the gLM layout: " + "; ".join(problems))
    params["encoder"] = {ours: np.stack([stack[i] for i in range(config.num_layers)]) for ours, stack in per_layer.items()}
    return params, dropped


def params_to_torch(params: dict, config: GLMConfig) -> dict[str, np.ndarray]:
    """glm-jax nested params -> the original's state dict keys (the tensors its forward uses)."""
    state_dict = {name: _to_torch(kind, np.asarray(params[ours])) for name, (ours, kind) in TOP_TENSORS.items()}
    for torch_name, (ours, kind) in LAYER_TENSORS.items():
        for i in range(config.num_layers):
            state_dict[f"{PREFIX}encoder.layer.{i}.{torch_name}"] = _to_torch(kind, np.asarray(params["encoder"][ours][i]))
    return {name: np.ascontiguousarray(tensor, np.float32) for name, tensor in state_dict.items()}


def config_for_conversion(state_dict, hf_config_path=None, config_path=None, overrides=()) -> GLMConfig:
    """The config of a checkpoint being converted: from --hf-config, --config, or the shapes."""
    if hf_config_path:
        try:
            hf_config = json.loads(pathlib.Path(hf_config_path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{hf_config_path}: not a JSON config: {first_line(error)}") from None
        return GLMConfig.from_hf_dict(hf_config)
    if config_path:
        from glm_jax.config import load_config
        from glm_jax.model.glm import config_from_dict_like
        return config_from_dict_like(load_config(config_path, overrides).model)
    return infer_config(strip_wrappers(state_dict))


def convert_torch(source: str | pathlib.Path, destination: str | pathlib.Path, *, hf_config_path=None,
                  config_path=None, overrides=(), overwrite: bool = False) -> dict:
    """Original state dict file -> glm-jax model directory; returns counts of what was kept."""
    state_dict = read_state_dict(source)
    try:
        config = config_for_conversion(state_dict, hf_config_path, config_path, overrides)
        params, dropped = torch_to_params(state_dict, config)
    except ConfigError:
        raise
    except ValueError as error:  # the tensors of `source` are at fault: say which file
        raise CheckpointError(f"{source}: {error}") from None
    model = checkpoint.model_from_params(config, params, source=f"tensors of {source}")
    checkpoint.save_model(destination, model, overwrite=overwrite)
    dropped_values = sum(np.size(state_dict[k]) for k in dropped)
    return {"used_values": sum(np.size(t) for t in state_dict.values()) - dropped_values,
            "dropped_tensors": len(dropped), "dropped_values": dropped_values}


def export_torch(source: str | pathlib.Path, destination: str | pathlib.Path) -> tuple[int, pathlib.Path]:
    """glm-jax model directory -> original-layout state dict at `destination` plus its
    RobertaConfig JSON beside it (DEST.config.json); returns (tensor count, config path)."""
    model = checkpoint.load_model(source)
    state_dict = params_to_torch(checkpoint.params_as_dict(model), model.config)
    write_state_dict(destination, state_dict)
    config_path = pathlib.Path(destination).with_suffix(".config.json")
    files.write_text_atomic(config_path, json.dumps(model.config.to_hf_dict(), indent=2))
    return len(state_dict), config_path
