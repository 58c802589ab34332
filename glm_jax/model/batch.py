"""The one check of a batch of contig windows against a model, shared by training and inference.

A batch is a dict of arrays (the names of make-shards, `forward`'s .npz and the readers):
    inputs_embeds  [batch, genes, emb_dim]   gene features (orientation last)
    attention_mask [batch, genes]            1 = gene, 0 = padding
    labels         [batch, genes, num_pc]    optional (training: required)
    masked_tokens  [batch, genes] or [batch, genes, 1]   optional, genes to mask (inference)
"""
from __future__ import annotations

import numpy as np

from glm_jax.errors import InputError
from glm_jax.model.glm import GLMConfig


class BatchError(InputError):
    """A batch that does not fit the model; the message names the source, the field and the rows."""


def _rows(bad: np.ndarray, limit: int = 5) -> list[list[int]]:
    """[contig, gene] indices of the first `limit` offending rows."""
    return np.argwhere(bad)[:limit].tolist()


def validate_batch(batch: dict, config: GLMConfig, *, source: str = "batch", batch_size: int | None = None,
                   require_labels: bool = False) -> dict:
    """Checks names, shapes and values; returns float32 inputs/mask/labels and bool masked_tokens.

    `source` names where the batch came from (a file, a reader) in every error; `batch_size`, when
    given, is the number of windows the caller expects.
    """
    required = ("inputs_embeds", "attention_mask") + (("labels",) if require_labels else ())
    missing = [name for name in required if name not in batch]
    if missing:
        raise BatchError(f"{source}: missing {', '.join(missing)} (has {', '.join(sorted(batch)) or 'nothing'})")
    inputs = np.asarray(batch["inputs_embeds"], np.float32)
    if inputs.ndim != 3 or inputs.shape[-1] != config.emb_dim:
        raise BatchError(f"{source}: inputs_embeds must be [batch, genes, {config.emb_dim}] for this model "
                         f"(emb_dim {config.emb_dim}), got {list(inputs.shape)}")
    b, s, _ = inputs.shape
    if batch_size is not None and b != batch_size:
        raise BatchError(f"{source}: {b} windows per batch, expected {batch_size}")
    if s > config.max_position_embeddings and not config.clip_distances:
        raise BatchError(f"{source}: {s} genes per contig; the model's distance table covers "
                         f"{config.max_position_embeddings} (max_position_embeddings; clip_distances "
                         "lifts the limit)")
    mask = np.asarray(batch["attention_mask"], np.float32)
    if mask.shape != (b, s):
        raise BatchError(f"{source}: attention_mask must be [{b}, {s}], got {list(mask.shape)}")
    if not np.isin(mask, (0, 1)).all():
        raise BatchError(f"{source}: attention_mask must hold only 0 (padding) and 1 (gene)")
    if not mask.any(axis=1).all():
        raise BatchError(f"{source}: contig(s) {np.flatnonzero(~mask.any(axis=1))[:5].tolist()} have no genes")
    finite = np.isfinite(inputs).all(-1)
    if not finite.all():
        raise BatchError(f"{source}: inputs_embeds contain NaN/Inf at [contig, gene] {_rows(~finite)}")
    out = {"inputs_embeds": inputs, "attention_mask": mask}
    if "masked_tokens" in batch:
        masked = np.asarray(batch["masked_tokens"])
        masked = masked.reshape(masked.shape[:2]) if masked.ndim == 3 and masked.shape[-1] == 1 else masked
        if masked.shape != (b, s):
            raise BatchError(f"{source}: masked_tokens must be [{b}, {s}] or [{b}, {s}, 1], got {list(masked.shape)}")
        out["masked_tokens"] = masked.astype(bool) & (mask != 0)
    if "labels" in batch:
        labels = np.asarray(batch["labels"], np.float32)
        if labels.shape != (b, s, config.num_pc):
            raise BatchError(f"{source}: labels must be [{b}, {s}, {config.num_pc}] for this model "
                             f"(num_pc {config.num_pc}), got {list(labels.shape)}")
        finite = np.isfinite(labels).all(-1)
        if not finite.all():
            raise BatchError(f"{source}: labels contain NaN/Inf at [contig, gene] {_rows(~finite)}")
        out["labels"] = labels
        out.setdefault("masked_tokens", np.zeros((b, s), bool))
    return out
