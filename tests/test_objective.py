"""The masked-gene objective and metrics against direct re-statements of the original's rules."""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from glm_jax.model import objective
from glm_jax.interop import torch_reference as tr


def random_case(seed=0, b=6, s=30, p=4, c=10):
    rng = np.random.default_rng(seed)
    predictions = rng.normal(size=(b, s, p, c)).astype(np.float32)
    logits = rng.normal(size=(b, s, p)).astype(np.float32)
    labels = rng.normal(size=(b, s, c)).astype(np.float32)
    lengths = rng.integers(15, s + 1, size=b)
    attention = np.arange(s)[None] < lengths[:, None]
    labels *= attention[..., None]
    masked = (rng.random((b, s)) < 0.3) & attention
    return predictions, logits, labels, masked


def test_mask_sampling_never_masks_padding_and_hits_the_rate():
    attention = jnp.asarray(np.arange(30)[None].repeat(2000, 0) < 20)
    masked = objective.sample_gene_mask(jax.random.key(0), attention, 0.15)
    assert not bool((masked & ~attention).any())
    rate = float(masked.sum() / attention.sum())
    assert abs(rate - 0.15) < 0.005
    inputs = jnp.ones((2000, 30, 5))
    applied = objective.apply_gene_mask(inputs, masked)
    np.testing.assert_array_equal(np.asarray(applied[masked]), -1.0)
    np.testing.assert_array_equal(np.asarray(applied[~masked]), 1.0)


def test_all_positions_loss_equals_the_original_formula():
    predictions, logits, labels, masked = random_case()
    ours = objective.multi_hypothesis_loss(*map(jnp.asarray, (predictions, logits, labels, masked)))
    loss, mse, ce = tr.original_loss(*map(torch.from_numpy, (predictions, logits, labels, masked)))
    np.testing.assert_allclose([ours.loss, ours.mse, ours.ce], [loss.item(), mse.item(), ce.item()], rtol=1e-5)
    # unmasked positions count in the denominators and add log(num_pred) each to the CE
    assert float(ours.ce) > np.log(4) * (1 - masked.mean()) * 0.99


def test_masked_genes_reduction_averages_over_masked_genes_only():
    predictions, logits, labels, masked = random_case(seed=1)
    ours = objective.multi_hypothesis_loss(*map(jnp.asarray, (predictions, logits, labels, masked)),
                                           reduction="masked_genes")
    sq, ce = [], []
    for b, g in zip(*np.nonzero(masked)):
        d = np.linalg.norm(predictions[b, g] - labels[b, g], axis=-1)
        k = int(np.argmin(d))
        sq.append(np.mean((predictions[b, g, k] - labels[b, g]) ** 2))
        z = logits[b, g] - logits[b, g].max()
        ce.append(-(z[k] - np.log(np.exp(z).sum())))
    np.testing.assert_allclose(float(ours.mse), np.mean(sq), rtol=1e-5)
    np.testing.assert_allclose(float(ours.ce), np.mean(ce), rtol=1e-5)


def test_metrics_follow_the_per_gene_loop_of_the_original():
    predictions, logits, labels, masked = random_case(seed=2)
    # make some predictions right so both outcomes occur
    predictions[:3, :, 1] = labels[:3] + 0.01
    sums = objective.masked_gene_metrics(*map(jnp.asarray, (predictions, logits, labels, masked)))
    pseudo = absolute = confident = confident_correct = 0
    for b, g in zip(*np.nonzero(masked)):
        closest = np.argmin(np.linalg.norm(predictions[b, g] - labels[b, g], axis=-1))
        probs = np.exp(logits[b, g]) / np.exp(logits[b, g]).sum()
        likeliest = np.argmax(probs)

        def correct(k):
            return np.argmin(np.linalg.norm(labels[b] - predictions[b, g, k], axis=-1)) == g

        pseudo += correct(closest)
        absolute += correct(likeliest)
        confident += probs.max() > 0.75
        confident_correct += (probs.max() > 0.75) and correct(likeliest)
    assert int(sums["masked"]) == masked.sum()
    assert int(sums["pseudo_correct"]) == pseudo
    assert int(sums["absolute_correct"]) == absolute
    assert int(sums["confident"]) == confident and int(sums["confident_correct"]) == confident_correct
    assert int(sums["confidence_histogram"].sum()) == masked.sum()
    summary = objective.summarize_metrics(jax.device_get(sums))
    assert summary["pseudo_accuracy"] == pseudo / masked.sum()
    assert 0 < pseudo < masked.sum()


def test_labels_are_clipped_to_ten():
    labels = jnp.asarray([-30.0, -10.0, 3.0, 10.5])
    np.testing.assert_array_equal(np.asarray(objective.clip_labels(labels, 10.0)), [-10, -10, 3, 10])
    np.testing.assert_array_equal(np.asarray(objective.clip_labels(labels, 0.0)), np.asarray(labels))
