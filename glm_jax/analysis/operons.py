"""Operon prediction from gLM attention (the paper's Fig. 4 analysis) and its baselines.

A pair of neighbouring genes i, i+1 is described by feature sets, each scored on the same pairs:

  glm_attention             A[l,h][i,i+1] + A[l,h][i+1,i] for every layer l and head h
                            (num_layers * num_heads features, 190 for gLM-base; the original
                            operon_logreg.py feature), averaged over the windows holding both genes
  glm_attention_no_context  the same features from the model run on two-gene windows (each pair
                            alone, window=2 stride=1): the context-free ablation. It keeps the two
                            genes' own embeddings and removes every other gene of the contig.
  distance_strand           [clip(distance, -200, 2000) bp, log1p(max(distance, 0)), same_strand]
  esm2_cosine               cosine of the two genes' ESM2 embeddings, used as the score itself
                            (zero-shot, no fitting: the rule Bacformer uses)

Learned sets are scored by a logistic regression (L2, C=1, lbfgs, standardised features, as the
original's sklearn defaults apart from the scaling) under k-fold cross-validation. Folds are
**contiguous blocks** of pairs in genome order (contig, then position): neighbouring pairs share
genes and windows, so a random pair split would put near-copies of a test pair into training.
`ap` is the average precision of the pooled out-of-fold scores; `folds` holds each test block's AP.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pandas as pd

from glm_jax import files
from glm_jax.analysis import labels as labels_lib
from glm_jax.analysis import tables
from glm_jax.errors import InputError

ZERO_SHOT_SETS = ("esm2_cosine",)
DISTANCE_CLIP_BP = (-200.0, 2000.0)


@dataclasses.dataclass(frozen=True)
class LogisticModel:
    """p(same operon) = sigmoid(features @ coef + intercept); the original's operon_predictor is one."""
    coef: np.ndarray          # [features] float64
    intercept: float
    feature_set: str = "glm_attention"

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """[pairs, features] -> [pairs] float64."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.coef.shape[0]:
            raise InputError(f"the {self.feature_set} predictor takes {self.coef.shape[0]} features per pair, "
                             f"got an array of shape {list(features.shape)}")
        logits = features @ self.coef + self.intercept
        return 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid without overflow warnings

    def save(self, path: str | pathlib.Path) -> None:
        files.savez_atomic(path, coef=self.coef, intercept=np.float64(self.intercept),
                           feature_set=np.str_(self.feature_set))


def load_predictor(path: str | pathlib.Path) -> LogisticModel:
    """A predictor saved by `operons fit`, or the original's `operon_predictor.npz` (sklearn's
    `coef_` [1, F] and `intercept_` [1] arrays; attention features)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"operon predictor not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        arrays = dict(f)
    if "coef_" in arrays and "intercept_" in arrays:
        return LogisticModel(np.asarray(arrays["coef_"], np.float64).reshape(-1), float(arrays["intercept_"].reshape(-1)[0]))
    if "coef" in arrays and "intercept" in arrays:
        return LogisticModel(np.asarray(arrays["coef"], np.float64), float(arrays["intercept"]), str(arrays["feature_set"]))
    raise InputError(f"{path}: not an operon predictor (needs coef/intercept or sklearn's coef_/intercept_, "
                     f"has {sorted(arrays)})")


def fit_logistic(features: np.ndarray, labels: np.ndarray, feature_set: str) -> LogisticModel:
    """Standardise, fit an L2 logistic regression, and fold the scaling into coef/intercept."""
    from sklearn.linear_model import LogisticRegression

    features = np.asarray(features, np.float64)
    if len(np.unique(labels)) < 2:
        raise InputError(f"cannot fit the {feature_set} predictor: the training pairs hold one class only")
    mean, scale = features.mean(0), features.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    regression = LogisticRegression(C=1.0, max_iter=5000).fit((features - mean) / scale, labels)
    coef = regression.coef_[0] / scale
    return LogisticModel(coef, float(regression.intercept_[0] - coef @ mean), feature_set)


def block_folds(num_pairs: int, num_folds: int) -> np.ndarray:
    """[pairs] fold index: `num_folds` contiguous blocks of (nearly) equal size, in table order."""
    if num_pairs < num_folds:
        raise InputError(f"{num_pairs} gene pairs cannot be split into {num_folds} folds")
    return (np.arange(num_pairs) * num_folds) // num_pairs


def distance_strand_features(pairs: pd.DataFrame) -> np.ndarray:
    """[pairs, 3]: clipped intergenic distance (bp), log1p of the non-negative distance, same strand."""
    distance = pairs["distance"].to_numpy(np.float64)
    return np.stack([np.clip(distance, *DISTANCE_CLIP_BP), np.log1p(np.maximum(distance, 0.0)),
                     pairs["same_strand"].to_numpy(np.float64)], axis=1)


def esm2_cosine(genes: pd.DataFrame, pairs: pd.DataFrame) -> np.ndarray:
    """[pairs] cosine similarity of the ESM2 embeddings of the two genes."""
    vectors = tables.stack(genes, "esm2").astype(np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    row = pd.Series(np.arange(len(genes)), index=genes["gene_id"].to_numpy())
    a = vectors[row[pairs["gene_id_a"]].to_numpy()]
    b = vectors[row[pairs["gene_id_b"]].to_numpy()]
    return np.einsum("pd,pd->p", a, b)


def cross_validated_scores(features: np.ndarray, labels: np.ndarray, folds: np.ndarray, feature_set: str) -> np.ndarray:
    """[pairs] out-of-fold probabilities: each fold scored by a model fitted on the others."""
    scores = np.empty(len(labels))
    for fold in np.unique(folds):
        test = folds == fold
        scores[test] = fit_logistic(features[~test], labels[~test], feature_set).probabilities(features[test])
    return scores


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(labels, scores)) if labels.any() else float("nan")


def feature_sets(genes: pd.DataFrame, pairs: pd.DataFrame) -> dict[str, np.ndarray]:
    """Every feature set the tables allow: name -> [pairs, F] features (learned) or [pairs] scores."""
    sets = {"distance_strand": distance_strand_features(pairs)}
    if "esm2" in genes.columns:
        sets["esm2_cosine"] = esm2_cosine(genes, pairs)
    for name in ("glm_attention", "glm_attention_no_context"):
        if name in pairs.columns:
            sets[name] = tables.stack(pairs, name, "pair table")
    return sets


def join_attention(pairs: pd.DataFrame, attention_pairs: pd.DataFrame | None, name: str) -> pd.DataFrame:
    """Adds an inference pair table's `attention` column to `pairs` as column `name`, keeping only
    the pairs it covers (a pair split by every window boundary has no attention)."""
    if attention_pairs is None:
        return pairs
    tables.require_columns(attention_pairs, ("gene_id_a", "gene_id_b", "attention"), "pair table")
    covered = attention_pairs[["gene_id_a", "gene_id_b", "attention"]].rename(columns={"attention": name})
    return pairs.merge(covered, on=["gene_id_a", "gene_id_b"], how="inner", validate="one_to_one")


def evaluate(genes: pd.DataFrame, labels_path: str | pathlib.Path, *, attention_pairs: pd.DataFrame | None = None,
             no_context_pairs: pd.DataFrame | None = None, predictor: LogisticModel | None = None,
             num_folds: int = 5) -> tuple[dict, pd.DataFrame]:
    """Cross-validated AP of every available feature set on the genes' adjacent pairs.

    Returns (report, scores): the report dict (what operons.json holds) and one row per evaluated
    pair with its label and each set's out-of-fold score. With `predictor` (e.g. the original's
    coefficients) its zero-shot AP is reported as "predictor"."""
    pairs = tables.adjacent_pairs(genes)
    all_pairs = len(pairs)
    pairs = join_attention(pairs, attention_pairs, "glm_attention")
    pairs = join_attention(pairs, no_context_pairs, "glm_attention_no_context")
    pairs = pairs.sort_values(["contig", "position_a"], kind="stable").reset_index(drop=True)
    y = labels_lib.operon_pair_labels(genes, pairs, labels_path)
    folds = block_folds(len(pairs), num_folds)
    scores = pairs[["contig", "gene_id_a", "gene_id_b", "position_a"]].assign(label=y, fold=folds)
    report = {"labels": str(labels_path), "pairs": int(len(pairs)), "pairs_without_attention": all_pairs - len(pairs),
              "positive_pairs": int(y.sum()), "positive_rate": float(y.mean()), "num_folds": num_folds,
              "folds": "contiguous blocks of pairs in genome order", "feature_sets": {}}
    available = feature_sets(genes, pairs)
    for name, values in available.items():
        if name in ZERO_SHOT_SETS:
            score, method = values, "zero-shot score (no fitting)"
        else:
            score = cross_validated_scores(values, y, folds, name)
            method = f"logistic regression on {values.shape[1]} features, {num_folds}-fold CV"
        scores[name] = score
        report["feature_sets"][name] = _ap_entry(y, score, folds, method)
    if predictor is not None:
        if predictor.feature_set not in available:
            raise tables.TableError(f"the predictor uses {predictor.feature_set} features, which these tables lack")
        scores["predictor"] = predictor.probabilities(available[predictor.feature_set])
        report["feature_sets"]["predictor"] = _ap_entry(y, scores["predictor"], folds,
                                                        f"given predictor on {predictor.feature_set}, zero-shot")
    return report, scores


def _ap_entry(y: np.ndarray, score: np.ndarray, folds: np.ndarray, method: str) -> dict:
    per_fold = [average_precision(y[folds == f], score[folds == f]) for f in np.unique(folds)]
    return {"ap": average_precision(y, score), "folds": per_fold, "ap_mean": float(np.mean(per_fold)),
            "ap_std": float(np.std(per_fold)), "method": method}


def write_report(report: dict, scores: pd.DataFrame, output_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """DIR/operons.json, DIR/operon_scores.parquet and the precision-recall plot DIR/operons_pr.png."""
    from glm_jax.analysis import plots

    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"report": output_dir / "operons.json", "scores": output_dir / "operon_scores.parquet",
             "plot": output_dir / "operons_pr.png"}
    files.write_text_atomic(paths["report"], json.dumps(report, indent=2) + "\n")
    files.atomic_write(paths["scores"], lambda handle: scores.to_parquet(handle, index=False))
    curves = {name: scores[name].to_numpy() for name in report["feature_sets"]}
    plots.pr_curves(scores["label"].to_numpy(), curves, paths["plot"],
                    title=f"Operon pairs ({report['pairs']} pairs, {report['positive_rate']:.0%} positive)")
    return paths

