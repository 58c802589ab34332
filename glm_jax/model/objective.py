"""The gLM masked-gene objective and its metrics, as pure jit-able functions.

docs/ARCHITECTURE.md#objective: 15% of real genes are masked (their whole input row set to -1.0); the
head proposes `num_pred` hypotheses per gene; the loss is the MSE of the hypothesis closest to
the (clipped) label plus 1e-4 x cross-entropy of the logits against that hypothesis' index.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

REDUCTIONS = ("all_positions", "masked_genes")
CONFIDENCE_THRESHOLD = 0.75  # the paper's "high confidence" cut-off
CONFIDENCE_BINS = 10


def sample_gene_mask(rng: jax.Array, attention_mask: jax.Array, mask_prob: float) -> jax.Array:
    """Each real gene masked independently with `mask_prob`; padding never. [b, s] -> bool [b, s]"""
    return (jax.random.uniform(rng, attention_mask.shape) < mask_prob) & (attention_mask != 0)


def apply_gene_mask(inputs_embeds: jax.Array, masked: jax.Array, mask_value: float = -1.0) -> jax.Array:
    """Sets every feature of masked genes to `mask_value`. [b, s, f], bool [b, s] -> [b, s, f]"""
    return jnp.where(masked[..., None], jnp.asarray(mask_value, inputs_embeds.dtype), inputs_embeds)


def clip_labels(labels: jax.Array, clip: float) -> jax.Array:
    """The original clips labels to [-clip, clip]; clip <= 0 disables it."""
    return jnp.clip(labels, -clip, clip) if clip > 0 else labels


class LossTerms(NamedTuple):
    loss: jax.Array            # scalar: mse + prob_loss_weight * ce
    mse: jax.Array             # scalar
    ce: jax.Array              # scalar
    closest: jax.Array         # [b, s] int32 index of the hypothesis nearest the label
    closest_prediction: jax.Array  # [b, s, c] that hypothesis (zero at unmasked genes)


def multi_hypothesis_loss(predictions, logits, labels, masked, *, prob_loss_weight: float = 1e-4,
                          reduction: str = "all_positions") -> LossTerms:
    """Closest-hypothesis MSE + weighted cross-entropy of the hypothesis logits.

    predictions: [b, s, p, c]; logits: [b, s, p]; labels: [b, s, c] (already clipped);
    masked: bool [b, s].

    "all_positions" reproduces the original exactly: predictions, labels and logits are
    multiplied by the mask, so unmasked positions pick hypothesis 0 at distance 0, add zeros to
    the MSE and log(p) to the CE, and both means run over all b*s positions. "masked_genes"
    averages over masked genes only.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    m = masked.astype(jnp.float32)
    predictions = predictions.astype(jnp.float32) * m[..., None, None]
    labels = labels.astype(jnp.float32) * m[..., None]
    logits = logits.astype(jnp.float32) * m[..., None]
    distances = jnp.linalg.norm(predictions - labels[:, :, None, :], axis=-1)      # [b, s, p]
    closest = jnp.argmin(distances, axis=-1)                                        # first on ties
    closest_prediction = jnp.take_along_axis(predictions, closest[..., None, None], axis=2)[:, :, 0]
    squared_error = jnp.square(closest_prediction - labels)                         # [b, s, c]
    cross_entropy = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), closest[..., None], -1)[..., 0]
    if reduction == "all_positions":
        mse = squared_error.mean()
        ce = cross_entropy.mean()
    else:
        count = jnp.maximum(m.sum(), 1.0)
        mse = squared_error.sum() / (count * labels.shape[-1])
        ce = (cross_entropy * m).sum() / count
    return LossTerms(mse + prob_loss_weight * ce, mse, ce, closest.astype(jnp.int32), closest_prediction)


def nearest_gene_is_self(prediction: jax.Array, labels: jax.Array) -> jax.Array:
    """For each gene, is its prediction nearer to its own label than to any other row of its contig?

    prediction: [b, s, c]; labels: [b, s, c] (all rows, padding included, as the original)
    -> bool [b, s]. Ties resolve to the lowest index, like torch.argmin.
    """
    distances = jnp.linalg.norm(prediction[:, :, None, :] - labels[:, None, :, :], axis=-1)  # [b, s, s]
    return jnp.argmin(distances, axis=-1) == jnp.arange(labels.shape[1])[None, :]


def masked_gene_metrics(predictions, logits, labels, masked) -> dict[str, jax.Array]:
    """Sums for the paper's metrics over masked genes (sum over batches, then divide by `masked`).

    pseudo-accuracy: the hypothesis closest to the true label is nearest to the gene's own label
    among all label rows of its contig. absolute accuracy: the same test for the hypothesis with
    the highest probability. confidence: that highest probability.
    Returns sums: masked, pseudo_correct, absolute_correct, confident (> 0.75),
    confident_correct, confidence_sum, and confidence_histogram [10] over [0, 1].
    """
    labels = labels.astype(jnp.float32)
    predictions = predictions.astype(jnp.float32)
    m = masked.astype(jnp.float32)
    distances = jnp.linalg.norm(predictions - labels[:, :, None, :], axis=-1)
    closest = jnp.argmin(distances, axis=-1)
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    likeliest = jnp.argmax(probabilities, axis=-1)
    confidence = probabilities.max(axis=-1)

    def pick(index):
        return jnp.take_along_axis(predictions, index[..., None, None], axis=2)[:, :, 0]

    pseudo = nearest_gene_is_self(pick(closest), labels).astype(jnp.float32) * m
    absolute = nearest_gene_is_self(pick(likeliest), labels).astype(jnp.float32) * m
    confident = (confidence > CONFIDENCE_THRESHOLD).astype(jnp.float32) * m
    bins = jnp.clip((confidence * CONFIDENCE_BINS).astype(jnp.int32), 0, CONFIDENCE_BINS - 1)
    histogram = jnp.zeros(CONFIDENCE_BINS).at[bins.reshape(-1)].add(m.reshape(-1))
    return {
        "masked": m.sum(),
        "pseudo_correct": pseudo.sum(),
        "absolute_correct": absolute.sum(),
        "confident": confident.sum(),
        "confident_correct": (confident * absolute).sum(),
        "confidence_sum": (confidence * m).sum(),
        "confidence_histogram": histogram,
    }


def summarize_metrics(sums: dict) -> dict[str, float]:
    """Ratios from (possibly accumulated) `masked_gene_metrics` sums."""
    masked = max(float(sums["masked"]), 1.0)
    confident = max(float(sums["confident"]), 1.0)
    return {
        "pseudo_accuracy": float(sums["pseudo_correct"]) / masked,
        "absolute_accuracy": float(sums["absolute_correct"]) / masked,
        "mean_confidence": float(sums["confidence_sum"]) / masked,
        "confident_fraction": float(sums["confident"]) / masked,
        "confident_accuracy": float(sums["confident_correct"]) / confident,
    }
