"""Hypotheses of masked genes and the real genes nearest to them (the paper's ModA/ModC analysis).

gLM predicts, for a masked gene, `num_pred` hypotheses in the label space (99 whitened PCs of the
normalised ESM2 embedding + orientation) with a probability each. Placing every gene of a corpus
in the same space shows which real proteins a hypothesis stands for: the masked gene itself, a
paralog, or an interchangeable protein from another context. Distances are Euclidean over the
PCs (the orientation dimension is left out: it only says which strand).

Gene table columns: the masked-gene hypotheses `context_hypotheses`/`context_probabilities`
(inference with each gene masked in turn), else the unmasked `hypotheses`/`probabilities`; corpus
positions from `label_embedding` (the model's label of each gene), else computed from `esm2` with
the checkpoint's feature transform.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from glm_jax.analysis import tables
from glm_jax.data.features import FeatureTransform


def corpus_labels(genes: pd.DataFrame, transform: FeatureTransform | None) -> np.ndarray:
    """[genes, K] every gene's label-space position (whitened PCs of its normalised ESM2 vector)."""
    if "label_embedding" in genes.columns:
        return tables.stack(genes, "label_embedding").astype(np.float64)[:, :-1]
    if transform is None:
        raise tables.TableError("gene table has no label_embedding column: pass the feature transform "
                                "(--feature-transform) to place the genes' esm2 vectors in the label space")
    embeddings = tables.stack(genes, "esm2")
    if embeddings.shape[1] != transform.mean.shape[0]:
        raise tables.FeatureWidthError(f"the feature transform is for {transform.mean.shape[0]}-d embeddings, the gene "
                                       f"table's esm2 column is {embeddings.shape[1]}-d")
    return transform.project(transform.normalize(embeddings))


def hypotheses_of(genes: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """([genes, num_pred, num_pc] hypotheses, [genes, num_pred] probabilities) from the gene table."""
    prefix = "context_" if "context_hypotheses" in genes.columns else ""
    probabilities = tables.stack(genes, f"{prefix}probabilities").astype(np.float64)
    flat = tables.stack(genes, f"{prefix}hypotheses").astype(np.float64)
    num_pred = probabilities.shape[1]
    if flat.shape[1] % num_pred:
        raise tables.TableError(f"hypotheses width {flat.shape[1]} is not a multiple of num_pred {num_pred}")
    return flat.reshape(len(genes), num_pred, -1), probabilities


def nearest_genes(genes: pd.DataFrame, transform: FeatureTransform | None = None, *, gene_ids: Sequence[str] | None = None,
                  top_hypotheses: int | None = None, neighbours: int = 5) -> pd.DataFrame:
    """One row per (masked gene, hypothesis, neighbour), hypotheses by falling probability:
    gene_id, product, hypothesis_rank (1 = most probable), probability, distance_to_self (of
    the hypothesis to the masked gene's own label), neighbour_rank, neighbour_gene_id,
    neighbour_product, distance, is_self."""
    labels = corpus_labels(genes, transform)
    hypotheses, probabilities = hypotheses_of(genes)
    if hypotheses.shape[2] - 1 != labels.shape[1]:
        raise tables.FeatureWidthError(f"hypotheses have {hypotheses.shape[2]} dims, the feature transform gives "
                                       f"{labels.shape[1]} PCs (+1 orientation expected)")
    ids = genes["gene_id"].to_numpy()
    products = genes["product"].fillna("").to_numpy() if "product" in genes.columns else np.full(len(genes), "")
    if gene_ids is None:
        selected = np.arange(len(genes))
    else:
        row_of = {g: i for i, g in enumerate(ids)}
        unknown = [g for g in gene_ids if g not in row_of]
        if unknown:
            raise tables.TableError(f"gene table has no gene_id {unknown[0]!r}")
        selected = np.array([row_of[g] for g in gene_ids], np.int64)
    top = hypotheses.shape[1] if top_hypotheses is None else min(top_hypotheses, hypotheses.shape[1])
    neighbours = min(neighbours, len(genes))
    squared_norms = np.einsum("nk,nk->n", labels, labels)
    rows = []
    for i in selected:
        order = np.argsort(-probabilities[i])[:top]
        points = hypotheses[i, order, :-1]                                   # [top, K], orientation dropped
        distances = np.sqrt(np.maximum(np.einsum("tk,tk->t", points, points)[:, None] + squared_norms[None]
                                       - 2.0 * points @ labels.T, 0.0))      # [top, genes]
        to_self = np.linalg.norm(points - labels[i], axis=1)
        for rank, (h, row) in enumerate(zip(order, distances), start=1):
            for n_rank, j in enumerate(np.argsort(row, kind="stable")[:neighbours], start=1):
                rows.append({"gene_id": ids[i], "product": products[i], "hypothesis_rank": rank,
                             "hypothesis_index": int(h), "probability": float(probabilities[i, h]),
                             "distance_to_self": float(to_self[rank - 1]), "neighbour_rank": n_rank,
                             "neighbour_gene_id": ids[j], "neighbour_product": products[j],
                             "distance": float(row[j]), "is_self": bool(j == i)})
    return pd.DataFrame(rows)
