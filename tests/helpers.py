"""Helpers shared by test modules (tests never import each other)."""
from __future__ import annotations

import numpy as np
import pandas as pd

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def composition_features(proteins) -> np.ndarray:
    """[genes, 21] amino-acid composition + log length: a cheap protein descriptor that stands in
    for ESM2 in tests (real ESM2 on a genome takes minutes on CPU)."""
    out = np.zeros((len(proteins), len(AMINO_ACIDS) + 1), np.float32)
    for i, protein in enumerate(proteins):
        counts = np.array([protein.count(a) for a in AMINO_ACIDS], np.float32)
        out[i, :-1] = counts / max(len(protein), 1)
        out[i, -1] = np.log(len(protein))
    return out


def tiny_config(emb_dim: int, num_layers: int = 2, num_heads: int = 2):
    from glm_jax.model.glm import GLMConfig

    return GLMConfig(emb_dim=emb_dim, hidden_size=16, num_layers=num_layers, num_heads=num_heads,
                     intermediate_size=32, max_position_embeddings=32, num_pc=8, num_pred=3,
                     hidden_dropout=0.0, attention_dropout=0.0)


def tiny_glm(emb_dim: int, num_layers: int = 2, num_heads: int = 2, seed: int = 0):
    """A random (untrained) gLM small enough for any test."""
    from flax import nnx

    from glm_jax.model.glm import GLM

    return GLM(tiny_config(emb_dim, num_layers, num_heads), nnx.Rngs(seed))


def model_tables(genes: pd.DataFrame, features: np.ndarray, model, window: int = 30, stride: int = 15):
    """The inference contract's tables, computed here from `forward` outputs and the definitions:
    genes + `embedding` (last layer, mean over windows) + `hypotheses`/`probabilities`; pairs with
    `attention` [layers * heads], feature l*H+h = A[l,h][i,i+1] + A[l,h][i+1,i] averaged over the
    windows holding both genes. `features` [genes, D] are the per-gene inputs (orientation appended)."""
    from glm_jax.inference.predict import forward

    genes = genes.sort_values(["contig", "position"], kind="stable").reset_index(drop=True)
    orientation = np.where(genes["strand"].to_numpy() > 0, 0.5, -0.5)[:, None]
    inputs = np.concatenate([features, orientation], 1).astype(np.float32)
    starts = []  # (first row, length) of every window, never crossing a contig
    for _, rows in genes.groupby("contig", sort=False).indices.items():
        first, n = rows[0], len(rows)
        for offset in range(0, max(n - window, 0) + stride, stride):
            length = min(window, n - offset)
            if length >= 2:
                starts.append((first + offset, length))
            if offset + window >= n:
                break
    batch = np.zeros((len(starts), window, inputs.shape[1]), np.float32)
    mask = np.zeros((len(starts), window), np.float32)
    for w, (first, length) in enumerate(starts):
        batch[w, :length], mask[w, :length] = inputs[first:first + length], 1
    out = forward(model, {"inputs_embeds": batch, "attention_mask": mask})
    hidden = np.zeros((len(genes), out["last_hidden_state"].shape[-1]))
    hypotheses = np.zeros((len(genes), int(np.prod(out["predictions"].shape[2:]))))
    probabilities = np.zeros((len(genes), out["probabilities"].shape[-1]))
    seen = np.zeros(len(genes))
    pair_sum, pair_count = {}, {}
    for w, (first, length) in enumerate(starts):
        rows = slice(first, first + length)
        hidden[rows] += out["last_hidden_state"][w, :length]
        hypotheses[rows] += out["predictions"][w, :length].reshape(length, -1)
        probabilities[rows] += out["probabilities"][w, :length]
        seen[rows] += 1
        a = out["attentions"][w]  # [layers, heads, genes, genes]
        for i in range(length - 1):
            value = (a[:, :, i, i + 1] + a[:, :, i + 1, i]).reshape(-1)
            pair_sum[first + i] = pair_sum.get(first + i, 0) + value
            pair_count[first + i] = pair_count.get(first + i, 0) + 1
    ids, contigs, positions = genes["gene_id"].to_numpy(), genes["contig"].to_numpy(), genes["position"].to_numpy()
    pairs = pd.DataFrame({"contig": [contigs[r] for r in pair_sum], "gene_id_a": [ids[r] for r in pair_sum],
                          "gene_id_b": [ids[r + 1] for r in pair_sum], "position_a": [positions[r] for r in pair_sum],
                          "attention": [(pair_sum[r] / pair_count[r]).astype(np.float32) for r in pair_sum]})
    covered = seen > 0
    genes = genes[covered].reset_index(drop=True)
    for name, values in (("embedding", hidden), ("hypotheses", hypotheses), ("probabilities", probabilities)):
        genes[name] = list((values[covered] / seen[covered, None]).astype(np.float32))
    return genes, pairs
