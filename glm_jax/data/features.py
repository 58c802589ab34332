"""Gene features and labels, exactly as the original's batch_data.py builds them.

For a protein embedding e (cast to float16 first, as the original stores them):
    z     = (e - mean) / std                                    normalised input [D]
    pcs   = ((z - pca_mean) @ components.T) / sqrt(explained_variance)   whitened PCA [K]
    input = concat(z, o),  label = concat(pcs, o),  o = +0.5 forward strand, -0.5 reverse
Everything is computed in float64 and cast to float16 last: that reproduces the reference
`batch.npz` bit for bit (float32 leaves ~1 in 5,000 elements one float16 ulp off).

`FeatureTransform` holds mean/std + PCA. It loads the reference `norm.npz` + `pca.npz` (keys
`mean`, `std` / sklearn's `mean_`, `components_`, `explained_variance_`) or this project's single
npz (`mean`, `std`, `pca_mean`, `pca_components`, `pca_explained_variance`, ...), which
`fit_feature_transform` writes: the same as scikit-learn's `PCA(whiten=True)` (sign convention
included), fitted from a streamed covariance so memory is O(D^2) for any corpus size.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterable

import numpy as np

from glm_jax import files
from glm_jax.errors import InputError

FORWARD, REVERSE = 0.5, -0.5


@dataclasses.dataclass(frozen=True)
class FeatureTransform:
    mean: np.ndarray                  # [D] float64, normalisation
    std: np.ndarray                   # [D] float64
    pca_mean: np.ndarray              # [D] mean of the normalised embeddings
    pca_components: np.ndarray        # [K, D] rows = principal axes
    pca_explained_variance: np.ndarray  # [K] (n - 1 denominator, as sklearn)
    pca_explained_variance_ratio: np.ndarray | None = None  # [K]
    n_samples: int = 0

    @property
    def emb_dim(self) -> int:
        """Width of the model input: D embedding dims + orientation."""
        return self.mean.shape[0] + 1

    @property
    def num_pc(self) -> int:
        """Width of the label: K components + orientation."""
        return self.pca_components.shape[0] + 1

    def normalize(self, embeddings: np.ndarray) -> np.ndarray:
        """[n, D] float16 (or anything castable) -> [n, D] float64."""
        return (np.asarray(embeddings, np.float16).astype(np.float64) - self.mean) / self.std

    def project(self, normalized: np.ndarray) -> np.ndarray:
        """[n, D] float64 normalised -> [n, K] whitened principal components (sklearn's transform)."""
        return ((normalized - self.pca_mean) @ self.pca_components.T) / np.sqrt(self.pca_explained_variance)

    def save(self, path: str | pathlib.Path) -> None:
        arrays = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        files.savez_atomic(path, **arrays)


def load_feature_transform(path: str | pathlib.Path, pca_path: str | pathlib.Path | None = None) -> FeatureTransform:
    """This project's npz, or the reference pair `norm.npz` (+ `pca_path` = `pca.npz`)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = dict(f)
    if "pca_components" in arrays:
        if pca_path is not None:
            raise InputError(f"{path} already holds a PCA; do not pass a separate PCA file")
        arrays["n_samples"] = int(arrays.get("n_samples", 0))
        known = {f.name for f in dataclasses.fields(FeatureTransform)}
        return FeatureTransform(**{k: v for k, v in arrays.items() if k in known})
    if pca_path is None:
        raise InputError(f"{path} has no PCA (keys {sorted(arrays)}); pass the PCA npz too")
    with np.load(pca_path, allow_pickle=False) as p:
        missing = {"mean_", "components_", "explained_variance_"} - set(p.files)
        if missing or not {"mean", "std"} <= set(arrays):
            raise InputError(f"expected mean/std in {path} and sklearn PCA arrays in {pca_path}; missing {sorted(missing)}")
        return FeatureTransform(arrays["mean"], arrays["std"], p["mean_"], p["components_"], p["explained_variance_"],
                                p["explained_variance_ratio_"] if "explained_variance_ratio_" in p.files else None)


def orientation(strands: np.ndarray) -> np.ndarray:
    """Strand +1/-1 -> +0.5/-0.5 (anything else, i.e. padding, -> 0)."""
    strands = np.asarray(strands)
    return np.where(strands > 0, FORWARD, np.where(strands < 0, REVERSE, 0.0))


def window_arrays(transform: FeatureTransform, embeddings: np.ndarray, rows: np.ndarray, strands: np.ndarray,
                  first_prot_id: int = 1, dtype=np.float16) -> dict[str, np.ndarray]:
    """Model-ready arrays of W windows of up to S genes.

    embeddings [U, D] (one row per distinct protein), rows [W, S] int (row of each gene, -1 = pad),
    strands [W, S] (+1/-1, 0 = pad). Returns
      inputs_embeds  [W, S, D + 1] dtype   (the original's `embeds`)
      labels         [W, S, K + 1] dtype   (the original's `label_embeds`)
      attention_mask [W, S] int64          1 gene, 0 pad
      prot_ids       [W, S] int64          running 1-based gene counter from first_prot_id, 0 pad
    Pad positions are 0 everywhere, as in the original."""
    rows = np.asarray(rows)
    mask = rows >= 0
    used, inverse = np.unique(rows[mask], return_inverse=True)  # featurise each used protein once
    normalized = transform.normalize(embeddings[used])
    pcs = transform.project(normalized)
    o = orientation(strands)[mask][:, None]
    w, s = rows.shape
    inputs = np.zeros((w, s, normalized.shape[1] + 1), dtype)
    labels = np.zeros((w, s, pcs.shape[1] + 1), dtype)
    inputs[mask] = np.concatenate([normalized[inverse], o], axis=1).astype(dtype)
    labels[mask] = np.concatenate([pcs[inverse], o], axis=1).astype(dtype)
    prot_ids = np.zeros((w, s), np.int64)
    prot_ids[mask] = np.arange(first_prot_id, first_prot_id + mask.sum())  # row-major = window order
    return {"inputs_embeds": inputs, "labels": labels, "attention_mask": mask.astype(np.int64), "prot_ids": prot_ids}


# --- fitting ----------------------------------------------------------------------------------

@dataclasses.dataclass
class _Moments:
    """Streaming sum and sum of outer products in float64."""
    n: int = 0
    total: np.ndarray | float = 0.0
    outer: np.ndarray | float = 0.0

    def add(self, x: np.ndarray) -> None:
        self.n += x.shape[0]
        self.total = self.total + x.sum(0)
        self.outer = self.outer + x.T @ x

    def mean(self) -> np.ndarray:
        return self.total / self.n

    def covariance(self) -> np.ndarray:
        """Unbiased (n - 1) covariance, as sklearn's PCA."""
        mean = self.mean()
        return (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)


def fit_feature_transform(embeddings: np.ndarray | Iterable[np.ndarray], num_components: int = 99,
                          min_std: float = 1e-6) -> FeatureTransform:
    """Fits mean/std, then PCA(num_components, whiten=True) of the normalised embeddings.

    `embeddings` is [n, D] or an iterable of [n_i, D] chunks (read twice if it is re-iterable;
    a one-shot iterator is materialised). Each embedding is cast to float16 first, as the
    original's pipeline does before normalising. std is the population std (ddof 0), floored at
    `min_std` so a constant dimension maps to 0 rather than NaN. The PCA is the eigendecomposition
    of the covariance (sklearn's `covariance_eigh` solver) with sklearn's sign convention
    (`svd_flip(u_based_decision=False)`: the largest |entry| of each component is positive)."""
    chunks = [embeddings] if isinstance(embeddings, np.ndarray) else embeddings
    if iter(chunks) is chunks:  # a one-shot iterator cannot be read twice
        chunks = list(chunks)
    as64 = lambda c: np.asarray(c, np.float16).astype(np.float64)
    raw = _Moments()
    for chunk in chunks:
        raw.add(as64(chunk))
    dim = raw.total.shape[0] if raw.n else 0
    if raw.n <= num_components or num_components > dim:
        raise InputError(f"PCA with {num_components} components needs more than {num_components} embeddings "
                         f"and dimension >= {num_components}; got {raw.n} x {dim}")
    mean = raw.mean()
    std = np.maximum(np.sqrt(np.maximum(np.diag(raw.outer) / raw.n - mean ** 2, 0.0)), min_std)
    normalized = _Moments()
    for chunk in chunks:
        normalized.add((as64(chunk) - mean) / std)
    covariance = normalized.covariance()
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.maximum(eigenvalues[order], 0.0)
    components = eigenvectors[:, order].T
    signs = np.sign(components[np.arange(dim), np.argmax(np.abs(components), axis=1)])
    components *= signs[:, None]
    return FeatureTransform(mean, std, normalized.mean(), components[:num_components], eigenvalues[:num_components],
                            eigenvalues[:num_components] / eigenvalues.sum(), raw.n)
