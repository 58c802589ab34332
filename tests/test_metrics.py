"""Every training/eval metric against numpy written from its definition (GLM_SPEC.md section 4,
the paper's accuracy and confidence figures), on random inputs and on hand-made edge cases."""
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.model import objective
from glm_jax.train import trainer

P, C = 4, 6  # hypotheses, label size


def definitions(predictions, logits, labels, masked, weight=1e-4):
    """The metrics of one batch, gene by gene in float64: a reading of the definitions.

    pseudo-accuracy: the hypothesis nearest (L2) the true label, nearest among ALL label rows of
    its contig (padding rows included) to the gene's own row; absolute accuracy: the same for
    the most probable hypothesis; confidence: that probability. Ties: the lowest index wins.
    Loss: "all_positions" averages over every position (unmasked ones count as zero error and
    CE of all-zero logits against class 0), "masked_genes" over masked genes only.
    """
    predictions, logits, labels = (np.asarray(x, np.float64) for x in (predictions, logits, labels))
    b, s = masked.shape
    per_gene = []
    total_sq = total_ce = 0.0
    for i in range(b):
        for g in range(s):
            m = bool(masked[i, g])
            label = labels[i, g] * m
            hypotheses = predictions[i, g] * m
            z = logits[i, g] * m
            closest = int(np.argmin([np.sqrt(((h - label) ** 2).sum()) for h in hypotheses]))
            log_probs = z - z.max() - np.log(np.exp(z - z.max()).sum())
            total_sq += ((hypotheses[closest] - label) ** 2).sum()
            total_ce += -log_probs[closest]
            if not m:
                continue
            probs = np.exp(logits[i, g] - logits[i, g].max())
            probs /= probs.sum()
            likeliest = int(np.argmax(probs))

            def nearest_is_self(k):
                distances = [np.sqrt(((predictions[i, g, k] - row) ** 2).sum()) for row in labels[i]]
                return int(np.argmin(distances)) == g

            per_gene.append({"pseudo": nearest_is_self(closest), "absolute": nearest_is_self(likeliest),
                             "confidence": probs.max(), "mse": ((predictions[i, g, closest] - labels[i, g]) ** 2).mean(),
                             "ce": -np.log(probs[closest])})
    n = len(per_gene)
    confident = [x for x in per_gene if x["confidence"] > 0.75]
    histogram = np.zeros(10, int)
    for x in per_gene:
        histogram[min(int(x["confidence"] * 10), 9)] += 1
    mse_all, ce_all = total_sq / (b * s * C), total_ce / (b * s)
    mse_masked = np.mean([x["mse"] for x in per_gene]) if n else 0.0
    ce_masked = np.mean([x["ce"] for x in per_gene]) if n else 0.0
    return {
        "masked": n,
        "pseudo_accuracy": sum(x["pseudo"] for x in per_gene) / n if n else 0.0,
        "absolute_accuracy": sum(x["absolute"] for x in per_gene) / n if n else 0.0,
        "mean_confidence": sum(x["confidence"] for x in per_gene) / n if n else 0.0,
        "confident_fraction": len(confident) / n if n else 0.0,
        "confident_accuracy": sum(x["absolute"] for x in confident) / len(confident) if confident else 0.0,
        "confidence_histogram": histogram,
        "all_positions": (mse_all + weight * ce_all, mse_all, ce_all),
        "masked_genes": (mse_masked + weight * ce_masked, mse_masked, ce_masked),
    }


def random_case(seed, b=5, s=12):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, s + 1, b)
    attention = np.arange(s)[None] < lengths[:, None]
    labels = rng.normal(size=(b, s, C)) * attention[..., None]
    predictions = rng.normal(size=(b, s, P, C))
    hit = rng.random((b, s)) < 0.6                         # some hypotheses near the truth
    predictions[:, :, 2] = np.where(hit[..., None], labels + 0.1 * rng.normal(size=labels.shape), predictions[:, :, 2])
    logits = 2.5 * rng.normal(size=(b, s, P))              # a spread of confidences,
    logits[:, :, 2] += 2.0 * hit                           # often on the right hypothesis
    masked = (rng.random((b, s)) < 0.5) & attention
    return [x.astype(np.float32) for x in (predictions, logits, labels)] + [masked]


def ours(predictions, logits, labels, masked):
    sums = objective.masked_gene_metrics(*map(jnp.asarray, (predictions, logits, labels, masked)))
    return {k: np.asarray(v) for k, v in sums.items()}


def assert_metrics_equal(sums, expected):
    summary = objective.summarize_metrics(sums)
    assert int(sums["masked"]) == expected["masked"]
    for name in ("pseudo_accuracy", "absolute_accuracy", "mean_confidence", "confident_fraction",
                 "confident_accuracy"):
        np.testing.assert_allclose(summary[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(sums["confidence_histogram"], expected["confidence_histogram"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_the_definitions_on_random_batches(seed):
    case = random_case(seed)
    expected = definitions(*case)
    assert 0 < expected["pseudo_accuracy"] < 1 and 0 < expected["absolute_accuracy"] < 1
    assert 0 < expected["confident_fraction"] < 1 and 0 < expected["confident_accuracy"] < 1
    assert expected["pseudo_accuracy"] != expected["absolute_accuracy"]  # a swapped numerator shows
    assert_metrics_equal(ours(*case), expected)


@pytest.mark.parametrize("reduction", objective.REDUCTIONS)
def test_loss_terms_equal_the_definitions(reduction):
    predictions, logits, labels, masked = random_case(3)
    terms = objective.multi_hypothesis_loss(*map(jnp.asarray, (predictions, logits, labels, masked)),
                                            prob_loss_weight=1e-4, reduction=reduction)
    np.testing.assert_allclose([terms.loss, terms.mse, terms.ce], definitions(predictions, logits, labels, masked)[reduction],
                               rtol=1e-5)


def test_hand_made_edge_cases():
    """One contig of 4 rows (row 3 padding), labels on the axes, 2-d labels, 4 hypotheses."""
    labels = np.zeros((1, 4, 2), np.float32)
    labels[0, 0], labels[0, 1], labels[0, 2] = [4, 0], [0, 4], [4, 0]   # row 2 duplicates row 0
    predictions = np.zeros((1, 4, P, 2), np.float32)
    logits = np.zeros((1, 4, P), np.float32)
    # gene 0: hypotheses 1 and 2 equally near the label -> hypothesis 1 (first)
    predictions[0, 0] = [[-4, 0], [4, 1], [4, -1], [9, 9]]
    logits[0, 0] = [0, 0, 5, 0]                       # likeliest: 2, confidence e^5/(e^5+3) = 0.98
    # gene 1: closest hypothesis [0.5, 0.5] is nearer the padding row's zero label than its own
    predictions[0, 1] = [[0.5, 0.5], [9, 9], [9, 9], [9, 9]]
    logits[0, 1] = [1, 1, 1, 1]                       # uniform: likeliest 0 (first), confidence 0.25
    # gene 2: its label equals row 0's: the nearest row is row 0 (lowest index), never itself
    predictions[0, 2] = [[4, 0], [9, 9], [9, 9], [9, 9]]
    logits[0, 2] = [0, 3, 0, 0]                       # likeliest 1, confidence e^3/(e^3+3) = 0.87
    masked = np.array([[True, True, True, False]])
    expected = definitions(predictions, logits, labels, masked)
    assert expected["pseudo_accuracy"] == 1 / 3          # gene 0 only
    assert expected["absolute_accuracy"] == 1 / 3        # gene 0 (hypothesis 2 is nearest row 0)
    assert expected["confident_fraction"] == 2 / 3 and expected["confident_accuracy"] == 1 / 2
    assert expected["confidence_histogram"].tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 1, 1]
    assert_metrics_equal(ours(predictions, logits, labels, masked), expected)
    terms = objective.multi_hypothesis_loss(*map(jnp.asarray, (predictions, logits, labels, masked)))
    assert int(terms.closest[0, 0]) == 1 and int(terms.closest[0, 3]) == 0


def test_no_masked_genes():
    """Ratios are 0 (not NaN); the original's all-positions CE is log(num_pred) at every position;
    the masked-genes mean is 0."""
    predictions, logits, labels, masked = random_case(4)
    masked[:] = False
    sums = ours(predictions, logits, labels, masked)
    assert all(v == 0 for v in objective.summarize_metrics(sums).values())
    assert not sums["confidence_histogram"].any()
    args = tuple(map(jnp.asarray, (predictions, logits, labels, masked)))
    all_positions = objective.multi_hypothesis_loss(*args)
    np.testing.assert_allclose([all_positions.mse, all_positions.ce], [0, np.log(P)], rtol=1e-6)
    masked_genes = objective.multi_hypothesis_loss(*args, reduction="masked_genes")
    assert float(masked_genes.loss) == 0


def test_eval_summary_weights_batches_by_their_normaliser():
    """Held-out loss = sum of per-batch means x normaliser / total normaliser; accuracies from
    the summed counts (not a mean of per-batch ratios)."""
    cases = [random_case(seed, b=b) for seed, b in ((5, 2), (6, 6))]
    for reduction in objective.REDUCTIONS:
        batch_sums = []
        for predictions, logits, labels, masked in cases:
            terms = objective.multi_hypothesis_loss(*map(jnp.asarray, (predictions, logits, labels, masked)),
                                                    reduction=reduction)
            n = float(trainer.loss_normalizer(jnp.asarray(masked), reduction))
            batch_sums.append({"loss_sum": float(terms.loss) * n, "mse_sum": float(terms.mse) * n,
                               "ce_sum": float(terms.ce) * n, "normalizer": n, **ours(predictions, logits, labels, masked)})
        summary = trainer.summarize_eval(batch_sums)
        expected = definitions(*(np.concatenate(arrays) for arrays in zip(*cases)))  # one batch of all contigs
        np.testing.assert_allclose(summary["loss"], expected[reduction][0], rtol=1e-5, err_msg=reduction)
    for name in ("pseudo_accuracy", "absolute_accuracy", "confident_accuracy"):
        np.testing.assert_allclose(summary[name], expected[name], rtol=1e-6, err_msg=name)
    assert summary["masked_genes"] == expected["masked"]
