"""Inference: the `glm-jax forward` batch contract and gene embeddings of trained models.

`glm-jax forward --checkpoint DIR --input batch.npz --output out.npz`

input .npz:   inputs_embeds [batch, genes, emb_dim], attention_mask [batch, genes]
              optional labels [batch, genes, num_pc], masked_tokens [batch, genes] (or [..., 1])
              (the original's `embeds` / `label_embeds` names are accepted)
output .npz:  last_hidden_state [batch, genes, hidden]
              hidden_states     [batch, layers + 1, genes, hidden]
              attentions        [batch, layers, heads, genes, genes]   (*)
              predictions       [batch, genes, num_pred, num_pc]
              probabilities     [batch, genes, num_pred]   softmax of the hypothesis logits
              contacts          [batch, genes, genes, layers * heads]  (*)
              (*) only with an attention implementation that materialises probabilities
              (`--attention reference` or `xla_shifted`); the printed summary says what was written.
              with labels: loss, mse, ce (the training objective), closest [batch, genes],
              pseudo_accuracy, absolute_accuracy, mean_confidence, confident_fraction,
              confident_accuracy (over masked genes)
Rows flagged in masked_tokens are set to -1.0 (the original's mask token) before the model.
"""
from __future__ import annotations

import pathlib
import zipfile
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax.model import objective
from glm_jax.model.batch import validate_batch
from glm_jax.model.glm import GLM, contacts_from_attentions
from glm_jax.data.shards import rename_original_arrays
from glm_jax.errors import InputError, first_line

OUTPUT_KEYS = ("last_hidden_state", "hidden_states", "attentions", "predictions", "probabilities", "contacts")


@nnx.jit(static_argnames=("with_labels", "label_clip", "reduction"))
def _forward(model: GLM, inputs_embeds, attention_mask, masked, labels, *, with_labels: bool,
             label_clip: float, reduction: str):
    inputs = objective.apply_gene_mask(inputs_embeds, masked)
    out = model(inputs, attention_mask, output_hidden_states=True, output_attentions=True)
    result = {
        "last_hidden_state": out.last_hidden_state.astype(jnp.float32),
        "hidden_states": out.hidden_states.astype(jnp.float32),
        "predictions": out.predictions,
        "probabilities": jax.nn.softmax(out.logits, axis=-1),
    }
    if out.attentions is not None:  # None: the attention implementation keeps no probabilities
        result.update(attentions=out.attentions, contacts=contacts_from_attentions(out.attentions))
    if with_labels:
        labels = objective.clip_labels(labels, label_clip)
        terms = objective.multi_hypothesis_loss(out.predictions, out.logits, labels, masked,
                                                prob_loss_weight=1e-4, reduction=reduction)
        result.update(loss=terms.loss, mse=terms.mse, ce=terms.ce, closest=terms.closest)
        result["metric_sums"] = objective.masked_gene_metrics(out.predictions, out.logits, labels, masked)
    return result


def _minibatches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def forward(model: GLM, batch: dict, *, batch_size: int = 64, label_clip: float = 0.0,
            reduction: str = "all_positions", source: str = "batch") -> dict[str, np.ndarray]:
    """Runs the model on a whole batch (checked by `validate_batch`, errors naming `source`) in
    minibatches; returns numpy outputs.

    The loss is averaged over minibatches weighted by their positions (the original's
    all-positions mean) or masked genes (the "masked_genes" reduction).
    """
    config = model.config
    batch = validate_batch(batch, config, source=source)
    with_labels = "labels" in batch
    n, s = batch["attention_mask"].shape
    masked_all = batch.get("masked_tokens", np.zeros((n, s), bool))
    pieces, sums, weighted, weights = [], [], {"loss": 0.0, "mse": 0.0, "ce": 0.0}, 0.0
    for part in _minibatches(n, batch_size):
        labels = batch["labels"][part] if with_labels else None
        out = _forward(model, jnp.asarray(batch["inputs_embeds"][part]), jnp.asarray(batch["attention_mask"][part]),
                       jnp.asarray(masked_all[part]), labels, with_labels=with_labels, label_clip=label_clip,
                       reduction=reduction)
        out = jax.device_get(out)
        if with_labels:
            weight = (part.stop - part.start) * s if reduction == "all_positions" else float(masked_all[part].sum())
            for key in weighted:
                weighted[key] += float(out.pop(key)) * weight
            weights += weight
            sums.append(out.pop("metric_sums"))
        pieces.append(out)
    result = {key: np.concatenate([p[key] for p in pieces]) for key in pieces[0]}
    if with_labels:
        result.update({key: np.float32(value / max(weights, 1.0)) for key, value in weighted.items()})
        totals = jax.tree.map(lambda *xs: np.sum(xs, axis=0), *sums)
        result.update({key: np.float32(v) for key, v in objective.summarize_metrics(totals).items()})
        result["masked_count"] = np.int64(totals["masked"])
    return result


def load_any_model(path: str, **config_changes) -> GLM:
    """A model directory (`save_model`, `convert-torch`) or a training workdir (latest step)."""
    from glm_jax.model import checkpoint
    directory = pathlib.Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (directory / checkpoint.PARAMS_DIR).exists():
        return checkpoint.load_model(directory, **config_changes)
    from glm_jax.train.checkpoint import load_model_from_workdir
    return load_model_from_workdir(directory, **config_changes)


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Reads a forward batch; the original's `embeds`/`label_embeds` names are accepted too."""
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"input not found: {path}")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not an .npz file (numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return rename_original_arrays({key: data[key] for key in data.files})
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"{path}: not a readable .npz of numeric arrays: {first_line(error)}") from None


@nnx.jit(static_argnames=("all_layers",))
def _embed_batch(model: GLM, inputs_embeds, attention_mask, *, all_layers: bool):
    out = model(inputs_embeds, attention_mask, output_hidden_states=all_layers)
    result = {"embeddings": out.last_hidden_state.astype(jnp.float32), "predictions": out.predictions,
              "probabilities": jax.nn.softmax(out.logits, axis=-1)}
    if all_layers:
        result["hidden_states"] = out.hidden_states.astype(jnp.float32).swapaxes(1, 2)
    return result


def embed_windows(model: GLM, batches, *, all_layers: bool = False, source: str = "shards") -> dict[str, np.ndarray]:
    """Per-gene outputs of unmasked windows, padding removed, in reader order.

    batches: dicts with inputs_embeds [b, s, f], attention_mask [b, s], gene_ids [b, s], contig_id [b]
    -> embeddings [genes, hidden] (the gLM embedding: last hidden state), predictions
    [genes, num_pred, num_pc], probabilities [genes, num_pred], gene_ids, contig_ids, positions
    (gene index within its window), and with all_layers hidden_states [genes, layers + 1, hidden].
    """
    pieces = []
    for batch in batches:
        checked = validate_batch(batch, model.config, source=source)
        out = jax.device_get(_embed_batch(model, jnp.asarray(checked["inputs_embeds"]),
                                          jnp.asarray(checked["attention_mask"]), all_layers=all_layers))
        real = checked["attention_mask"] > 0
        rows, positions = np.nonzero(real)
        piece = {key: value[real] for key, value in out.items()}
        piece["gene_ids"] = np.asarray(batch["gene_ids"])[real].astype(str)
        piece["contig_ids"] = np.asarray(batch["contig_id"])[rows].astype(str)
        piece["positions"] = positions.astype(np.int32)
        pieces.append(piece)
    if not pieces:
        raise InputError(f"{source}: no windows to embed")
    return {key: np.concatenate([p[key] for p in pieces]) for key in pieces[0]}
