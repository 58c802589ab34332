"""Linear probes: how much of a gene label a frozen representation holds, layer by layer.

Each feature set (the raw ESM2 embedding as the baseline, every stored gLM layer `layer_<i>`, the
last layer `embedding`) gets a standardised multinomial/binary logistic regression (L2, C=1)
under k-fold cross-validation: stratified folds by default, or GroupKFold when `groups` (contig or
genome of each gene) is given so that a contig's genes are never split between train and test.
Metrics are computed on the pooled out-of-fold predictions, with 95% confidence intervals from a
percentile bootstrap over genes (resampling the pooled predictions), and per-fold values beside:
accuracy and macro-F1 for multi-class tasks, AP and AUROC (of the positive class) for binary ones.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from glm_jax.analysis import tables
from glm_jax.errors import InputError

BASELINE = "esm2"


def representation_columns(genes: pd.DataFrame) -> list[str]:
    """The feature columns to probe, baseline first: esm2, layer_<i> by layer, embedding."""
    layers = sorted((c for c in genes.columns if re.fullmatch(r"layer_\d+", c)), key=lambda c: int(c.split("_")[1]))
    return [c for c in [BASELINE, *layers, "embedding"] if c in genes.columns]


def _metrics(y: np.ndarray, predicted: np.ndarray, positive_score: np.ndarray | None) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

    if positive_score is not None:
        return {"ap": float(average_precision_score(y, positive_score)), "auroc": float(roc_auc_score(y, positive_score))}
    return {"accuracy": float(accuracy_score(y, predicted)), "macro_f1": float(f1_score(y, predicted, average="macro"))}


def _folds(y: np.ndarray, groups: np.ndarray | None, num_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    if groups is None:
        return list(StratifiedKFold(num_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    if len(np.unique(groups)) < num_folds:
        raise InputError(f"grouped folds need >= {num_folds} groups (contigs/genomes), the labelled genes have "
                         f"{len(np.unique(groups))}; use fewer --folds or no --group-by")
    return list(GroupKFold(num_folds).split(np.zeros(len(y)), y, groups))


def out_of_fold(features: np.ndarray, y: np.ndarray, folds, num_classes: int) -> np.ndarray:
    """[genes, classes] out-of-fold class probabilities of a standardised logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probabilities = np.zeros((len(y), num_classes))
    for train, test in folds:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
        model.fit(features[train], y[train])
        probabilities[np.ix_(test, model[-1].classes_)] = model.predict_proba(features[test])
    return probabilities


def bootstrap_interval(y: np.ndarray, probabilities: np.ndarray, binary: bool, samples: int, seed: int) -> dict:
    """95% percentile interval of each metric over `samples` resamplings of the genes."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(samples):
        pick = rng.integers(0, len(y), len(y))
        if binary and len(np.unique(y[pick])) < 2:
            continue
        draws.append(_metrics(y[pick], probabilities[pick].argmax(1), probabilities[pick, 1] if binary else None))
    return {key: [float(np.percentile([d[key] for d in draws], 2.5)), float(np.percentile([d[key] for d in draws], 97.5))]
            for key in draws[0]}


def run_probes(genes: pd.DataFrame, rows: np.ndarray, y: np.ndarray, classes: list[str], *,
               columns: list[str] | None = None, groups: np.ndarray | None = None, group_name: str = "group", num_folds: int = 5,
               bootstrap: int = 1000, seed: int = 0) -> dict:
    """Probe every representation column on the labelled genes `rows` (class indices `y`).

    Classes with fewer genes than folds are left out (listed in the result)."""
    counts = np.bincount(y, minlength=len(classes))
    rare = [classes[i] for i in np.flatnonzero(counts < num_folds)]
    keep = counts[y] >= num_folds
    rows, y = rows[keep], y[keep]
    kept = [i for i in range(len(classes)) if counts[i] >= num_folds]
    y = np.searchsorted(kept, y)
    classes = [classes[i] for i in kept]
    if len(classes) < 2:
        raise InputError(f"a probe needs >= 2 classes with >= {num_folds} genes each, got {dict(zip(classes, counts[kept]))}")
    binary = len(classes) == 2
    folds = _folds(y, None if groups is None else np.asarray(groups)[rows], num_folds, seed)
    columns = representation_columns(genes) if columns is None else columns
    if not columns:
        raise tables.TableError("gene table has no representation column to probe (esm2, embedding, layer_<i>)")
    result = {"classes": classes, "class_counts": np.bincount(y).tolist(), "genes": int(len(y)),
              "left_out_classes": rare, "num_folds": num_folds,
              "folds": f"GroupKFold by {group_name}" if groups is not None else "stratified k-fold (shuffled)",
              "interval": f"95% percentile bootstrap over genes ({bootstrap} resamples) of pooled out-of-fold predictions",
              "majority_baseline": float(np.bincount(y).max() / len(y)), "representations": {}}
    for column in columns:
        features = tables.stack(genes.iloc[rows], column)
        probabilities = out_of_fold(features, y, folds, len(classes))
        per_fold = [_metrics(y[test], probabilities[test].argmax(1), probabilities[test, 1] if binary else None)
                    for _, test in folds if not binary or len(np.unique(y[test])) == 2]
        metrics = _metrics(y, probabilities.argmax(1), probabilities[:, 1] if binary else None)
        result["representations"][column] = {
            "dim": int(features.shape[1]), **metrics,
            "ci95": bootstrap_interval(y, probabilities, binary, bootstrap, seed),
            "folds": {key: [f[key] for f in per_fold] for key in metrics}}
    return result


def result_table(result: dict) -> pd.DataFrame:
    """One row per representation: each metric, its 95% interval and the fold mean +- sd."""
    rows = []
    for column, entry in result["representations"].items():
        row = {"representation": column, "dim": entry["dim"]}
        for key in entry["ci95"]:
            folds = np.asarray(entry["folds"][key])
            row[key] = round(entry[key], 4)
            row[f"{key}_ci95"] = f"[{entry['ci95'][key][0]:.3f}, {entry['ci95'][key][1]:.3f}]"
            row[f"{key}_folds"] = f"{folds.mean():.3f} +- {folds.std():.3f}"
        rows.append(row)
    return pd.DataFrame(rows)
