"""Running the model on a chunk of planned windows, data-parallel over this process's devices.

    runner = ModelRunner(model, jax.local_devices(), batch_size, options)
    result = compute_chunk(number, windows, featurize, runner, options, label_keys)
           -> {"genes": table, "pairs": table?, "maps": array?, "windows": table?}
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax import sharding
from glm_jax.inference import tables
from glm_jax.inference.options import InferenceInputError, InferenceOptions
from glm_jax.inference.plan import PlannedWindow
from glm_jax.model import objective
from glm_jax.model.glm import GLM


def load_checkpoint(checkpoint, attention_impl: str, clip_distances: bool, compute_dtype: str) -> GLM:
    """The model with the attention implementation (and distance clipping) `infer` asks for."""
    from glm_jax import kernels
    from glm_jax.inference.predict import load_any_model
    try:
        kernels.check_name(attention_impl)
    except kernels.AttentionConfigError as error:
        raise InferenceInputError(str(error)) from None
    changes = {"attention": attention_impl, **({"clip_distances": True} if clip_distances else {})}
    return load_any_model(str(checkpoint), compute_dtype=compute_dtype, **changes)


def _window_outputs(graphdef, state, inputs, mask, *, layers, hypotheses, attention):
    """Per-window outputs. inputs [B, S, E], mask [B, S] ->
    embedding [B, S, H], layers [B, len(layers), S, H], hypotheses [B, S, P * C], probabilities
    [B, S, P], pairs [B, S - 1, L * heads] (A[i, i+1] + A[i+1, i]), maps [B, L, heads, S, S]."""
    model = nnx.merge(graphdef, state)
    out = model(inputs, mask, output_hidden_states=bool(layers), output_attentions=attention is not None)
    result = {"embedding": out.last_hidden_state.astype(jnp.float32)}
    if layers:
        result["layers"] = out.hidden_states[:, jnp.array(layers)].astype(jnp.float32)
    if hypotheses:
        result["hypotheses"] = out.predictions.reshape(*out.predictions.shape[:2], -1)
        result["probabilities"] = jax.nn.softmax(out.logits, axis=-1)
    if attention == "pairs":
        a = out.attentions  # [B, L, heads, S, S]
        i = jnp.arange(a.shape[-1] - 1)
        pair = a[..., i, i + 1] + a[..., i + 1, i]  # [B, L, heads, S - 1]
        result["pairs"] = pair.reshape(a.shape[0], -1, a.shape[-1] - 1).swapaxes(1, 2)
    elif attention == "maps":
        result["maps"] = out.attentions
    return result


def _masked_outputs(graphdef, state, inputs, mask, positions, *, hypotheses):
    """Each row's gene at `positions` [B] replaced by the mask row (-1, the training mask) ->
    context_embedding [B, H] (+ context_hypotheses [B, P * C], context_probabilities [B, P])."""
    model = nnx.merge(graphdef, state)
    masked = jnp.arange(inputs.shape[1])[None] == positions[:, None]
    out = model(objective.apply_gene_mask(inputs, masked), mask)
    rows = jnp.arange(inputs.shape[0])
    result = {"context_embedding": out.last_hidden_state[rows, positions].astype(jnp.float32)}
    if hypotheses:
        result["context_hypotheses"] = out.predictions[rows, positions].reshape(inputs.shape[0], -1)
        result["context_probabilities"] = jax.nn.softmax(out.logits[rows, positions], axis=-1)
    return result


class ModelRunner:
    """Fixed-shape batches on a 1-D data-parallel mesh over `devices`; parameters replicated."""

    def __init__(self, model: GLM, devices: Sequence[jax.Device], batch_size: int, options: InferenceOptions):
        self.mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, list(devices))
        self.batch_size = -(-batch_size // len(devices)) * len(devices)  # a multiple of the devices
        graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, sharding.replicated(self.mesh))
        self.input_sharding = sharding.batch_sharding(self.mesh)
        self._windows = jax.jit(functools.partial(_window_outputs, graphdef, layers=tuple(options.layers),
                                                  hypotheses=options.hypotheses, attention=options.attention))
        self._masked = jax.jit(functools.partial(_masked_outputs, graphdef, hypotheses=options.hypotheses))
        self.calls = 0  # model calls (batches) made: what a resumed run must not repeat

    def _run(self, fn, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        n = len(arrays[0])
        pieces = []
        with sharding.use_mesh(self.mesh):
            for start in range(0, max(n, 1), self.batch_size):  # n = 0: one padded call gives the shapes
                batch = [_pad_rows(a[start:start + self.batch_size], self.batch_size) for a in arrays]
                batch = [jax.device_put(a, self.input_sharding) for a in batch]
                out = jax.device_get(fn(self.state, *batch))
                self.calls += 1
                pieces.append({k: v[:max(0, min(self.batch_size, n - start))] for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}

    def windows(self, inputs: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(self._windows, [inputs, mask])

    def masked(self, inputs: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(self._masked, [inputs, mask, positions.astype(np.int32)])


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """Zero rows appended up to `rows` (all-padding windows; their outputs are dropped)."""
    if len(array) == rows:
        return array
    return np.concatenate([array, np.zeros((rows - len(array),) + array.shape[1:], array.dtype)])


def compute_chunk(first_window: int, windows: Sequence[PlannedWindow], featurize: Callable, runner: ModelRunner,
                  options: InferenceOptions, label_keys: Sequence[str]) -> dict:
    """Runs the model on a chunk's windows (run-wide numbers first_window, first_window + 1, ...)
    -> {"genes": table, "pairs": table?, "maps": array?, "windows": table?} (pyarrow tables, rows
    in run-wide gene / pair order)."""
    arrays = featurize(windows)
    out = runner.windows(arrays["inputs_embeds"], arrays["attention_mask"])
    # rows of owned genes: (window in chunk, position in window)
    owned = [(i, j) for i, w in enumerate(windows) for j in np.flatnonzero(w.owned)]
    wi = np.array([i for i, _ in owned], np.int64)
    pj = np.array([j for _, j in owned], np.int64)
    vectors = {"embedding": out["embedding"][wi, pj]}
    for k, layer in enumerate(options.layers):
        vectors[f"layer_{layer}"] = out["layers"][wi, k, pj]
    if options.hypotheses:
        vectors.update(hypotheses=out["hypotheses"][wi, pj], probabilities=out["probabilities"][wi, pj],
                       label_embedding=arrays["labels"][wi, pj])
    if options.context_only:
        vectors.update(runner.masked(arrays["inputs_embeds"][wi], arrays["attention_mask"][wi], pj))
    if options.include_esm2:
        vectors["esm2"] = arrays["esm2"][wi, pj]
    result = {"genes": tables.gene_rows(windows, wi, pj, label_keys, vectors)}
    if options.attention == "pairs":
        result["pairs"] = tables.pair_sums(windows, out["pairs"])
    elif options.attention == "maps":
        result["maps"] = out["maps"]
        result["windows"] = tables.window_rows(first_window, windows)
    return result
