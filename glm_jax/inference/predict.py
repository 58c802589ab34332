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

import argparse
import pathlib
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax import kernels
from glm_jax.model import objective
from glm_jax.model.batch import validate_batch
from glm_jax.model.glm import GLM, contacts_from_attentions
from glm_jax.data.shards import rename_original_arrays

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


def add_attention_arguments(parser: argparse.ArgumentParser) -> None:
    """--attention and --clip-distances, for every command that runs a model."""
    parser.add_argument("--attention", choices=tuple(kernels.IMPLEMENTATIONS), default=None,
                        help="attention implementation (default: the checkpoint's, normally 'reference'); "
                             "only reference and xla_shifted return attention maps")
    parser.add_argument("--clip-distances", action="store_true", default=None,
                        help="gene distances beyond the model's max_position_embeddings - 1 use the "
                             "distance table's end rows (Shaw et al. 2018), so contigs of any length run")


def model_changes(args: argparse.Namespace) -> dict:
    """GLMConfig changes asked for by --dtype, --attention and --clip-distances."""
    changes = {"compute_dtype": args.dtype}
    if args.attention is not None:
        changes["attention"] = args.attention
    if args.clip_distances:
        changes["clip_distances"] = True
    return changes


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
    with np.load(path, allow_pickle=False) as data:
        return rename_original_arrays({key: data[key] for key in data.files})


def forward_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="glm-jax forward", description="run gLM on an .npz batch")
    parser.add_argument("--checkpoint", required=True, help="model directory or training workdir")
    parser.add_argument("--input", required=True, help=".npz with inputs_embeds, attention_mask[, labels, masked_tokens]")
    parser.add_argument("--output", required=True, help=".npz to write")
    parser.add_argument("--batch-size", type=int, default=64, help="contigs per device call")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="compute dtype (float16 is what the original's fp16 autocast ran)")
    parser.add_argument("--label-clip", type=float, default=0.0,
                        help="clip labels to +-value before the loss; 0 (default) passes them as given, like "
                             "the original model's forward; its train.py clips at 10")
    parser.add_argument("--reduction", default="all_positions", choices=objective.REDUCTIONS)
    add_attention_arguments(parser)
    args = parser.parse_args(argv)
    model = load_any_model(args.checkpoint, **model_changes(args))
    result = forward(model, read_npz(args.input), batch_size=args.batch_size, label_clip=args.label_clip,
                     source=args.input, reduction=args.reduction)
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp.npz")
    np.savez(tmp, **result)
    tmp.replace(output)
    summary = "".join(f", {k}={float(result[k]):.4f}" for k in ("loss", "pseudo_accuracy") if k in result)
    missing = [key for key in OUTPUT_KEYS if key not in result]
    not_written = (f"; not written: {', '.join(missing)} (attention {model.config.attention!r} keeps no "
                   "probabilities; use --attention reference or xla_shifted)") if missing else ""
    print(f"wrote {output}: {result['last_hidden_state'].shape[0]} contigs{summary}; "
          f"arrays: {', '.join(key for key in OUTPUT_KEYS if key in result)}{not_written}")
    return 0


@nnx.jit(static_argnames=("all_layers",))
def _embed_batch(model: GLM, inputs_embeds, attention_mask, *, all_layers: bool):
    out = model(inputs_embeds, attention_mask, output_hidden_states=all_layers)
    result = {"embeddings": out.last_hidden_state.astype(jnp.float32), "predictions": out.predictions,
              "probabilities": jax.nn.softmax(out.logits, axis=-1)}
    if all_layers:
        result["hidden_states"] = out.hidden_states.astype(jnp.float32).swapaxes(1, 2)
    return result


def embed_windows(model: GLM, batches, *, all_layers: bool = False) -> dict[str, np.ndarray]:
    """Per-gene outputs of unmasked windows, padding removed, in reader order.

    batches: dicts with inputs_embeds [b, s, f], attention_mask [b, s], gene_ids [b, s], contig_id [b]
    -> embeddings [genes, hidden] (the gLM embedding: last hidden state), predictions
    [genes, num_pred, num_pc], probabilities [genes, num_pred], gene_ids, contig_ids, positions
    (gene index within its window), and with all_layers hidden_states [genes, layers + 1, hidden].
    """
    pieces = []
    for batch in batches:
        checked = validate_batch(batch, model.config, source="window batch")
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
        raise ValueError("no windows to embed")
    return {key: np.concatenate([p[key] for p in pieces]) for key in pieces[0]}


def embed_main(argv) -> int:
    from tqdm import tqdm

    from glm_jax.data.shards import ShardReader
    parser = argparse.ArgumentParser(prog="glm-jax embed",
                                     description="gene embeddings and predictions of a trained gLM on shards")
    parser.add_argument("--checkpoint", required=True, help="model directory or training workdir")
    parser.add_argument("--shards", required=True, help="dataset directory written by make-shards (or shard files)")
    parser.add_argument("--split", default="eval", help="train or eval")
    parser.add_argument("--output", required=True, help=".npz to write")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--all-layers", action="store_true", help="also write every layer's hidden state")
    add_attention_arguments(parser)
    args = parser.parse_args(argv)
    model = load_any_model(args.checkpoint, **model_changes(args))
    reader = ShardReader(args.shards, batch_size=args.batch_size, split=args.split, shuffle=False, num_epochs=1,
                         drop_remainder=False, include_metadata=True)
    result = embed_windows(model, tqdm(reader, desc="embed", unit="batch"), all_layers=args.all_layers)
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp.npz")
    np.savez(tmp, **result)
    tmp.replace(output)
    print(f"wrote {output}: {len(result['gene_ids'])} genes from "
          f"{len(set(result['contig_ids']))} windows, embeddings {result['embeddings'].shape}")
    return 0
