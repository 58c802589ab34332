"""Features and labels: golden reproduction of the reference batch, PCA fit vs scikit-learn."""
import json

import numpy as np
import pytest

from glm_jax.data import features
from glm_jax.data.genomes import read_contig_table


@pytest.fixture(scope="module")
def reference(shared_data):
    ref = shared_data / "reference"
    ids = json.loads((ref / "test_esm_embs.json").read_text())["ids"]
    return {"transform": features.load_feature_transform(ref / "norm.npz", ref / "pca.npz"),
            "embs": np.load(ref / "test_esm_embs.npz")["embs"], "row": {pid: r for r, pid in enumerate(ids)},
            "table": read_contig_table(ref / "contig_to_prots.tsv"), "batch": dict(np.load(ref / "batch.npz")),
            "prot_index": json.loads((ref / "prot_index_dict.json").read_text())}


def test_golden_reference_batch_bit_exact(reference):
    """embeds / label_embeds / attention_mask / prot_ids of reference/batch.npz, bit for bit."""
    rows = np.array([[reference["row"][pid] for _, pid in entries] for _, entries in reference["table"]])
    strands = np.array([[strand for strand, _ in entries] for _, entries in reference["table"]])
    out = features.window_arrays(reference["transform"], reference["embs"], rows, strands)
    batch = reference["batch"]
    for ours, theirs in [("inputs_embeds", "embeds"), ("labels", "label_embeds"),
                         ("attention_mask", "attention_mask"), ("prot_ids", "prot_ids")]:
        assert out[ours].dtype == batch[theirs].dtype and out[ours].shape == batch[theirs].shape
        assert out[ours].tobytes() == batch[theirs].tobytes(), ours
    ids = [pid for _, entries in reference["table"] for _, pid in entries]
    assert {str(k): ids[k - 1] for k in out["prot_ids"].ravel()} == reference["prot_index"]


def test_padding_and_orientation(reference):
    rows = np.array([[0, 1, -1, -1], [2, -1, -1, -1]])
    strands = np.array([[1, -1, 0, 0], [-1, 0, 0, 0]])
    out = features.window_arrays(reference["transform"], reference["embs"], rows, strands, dtype=np.float32)
    assert out["inputs_embeds"].shape == (2, 4, 1281) and out["labels"].shape == (2, 4, 100)
    assert out["inputs_embeds"][0, :2, -1].tolist() == [0.5, -0.5] and out["labels"][1, 0, -1] == -0.5
    assert not out["inputs_embeds"][rows < 0].any() and not out["labels"][rows < 0].any()
    assert out["prot_ids"].tolist() == [[1, 2, 0, 0], [3, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def test_reference_projection_equals_sklearn_transform(reference):
    sklearn = pytest.importorskip("sklearn.decomposition")
    t = reference["transform"]
    pca = sklearn.PCA(n_components=99, whiten=True)
    pca.mean_, pca.components_, pca.explained_variance_ = t.pca_mean, t.pca_components, t.pca_explained_variance
    pca.n_components_, pca.n_features_in_ = 99, 1280
    z = t.normalize(reference["embs"])
    np.testing.assert_allclose(t.project(z), pca.transform(z), rtol=0, atol=1e-12)


def correlated(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 2 + rng.normal(size=d)).astype(np.float16)


@pytest.mark.parametrize("solver", ["full", "covariance_eigh"])
def test_fit_matches_sklearn_pca(solver):
    sklearn = pytest.importorskip("sklearn.decomposition")
    x = correlated(2000, 64)
    fitted = features.fit_feature_transform(x, num_components=20)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(fitted.mean, x64.mean(0), atol=1e-12)
    np.testing.assert_allclose(fitted.std, x64.std(0), rtol=1e-12)
    z = (x64 - x64.mean(0)) / x64.std(0)
    pca = sklearn.PCA(20, whiten=True, svd_solver=solver).fit(z)
    np.testing.assert_allclose(fitted.pca_components, pca.components_, atol=1e-9)  # same signs (svd_flip)
    np.testing.assert_allclose(fitted.pca_explained_variance, pca.explained_variance_, rtol=1e-10)
    np.testing.assert_allclose(fitted.pca_explained_variance_ratio, pca.explained_variance_ratio_, rtol=1e-10)
    np.testing.assert_allclose(fitted.project(fitted.normalize(x)), pca.transform(z), atol=1e-9)
    assert fitted.n_samples == 2000 and fitted.emb_dim == 65 and fitted.num_pc == 21


def test_fit_streams_chunks_and_round_trips(tmp_path, reference):
    x = correlated(700, 32, seed=1)
    whole = features.fit_feature_transform(x, 8)
    chunked = features.fit_feature_transform(iter([x[:300], x[300:650], x[650:]]), 8)
    for name in ("mean", "std", "pca_mean", "pca_components", "pca_explained_variance"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), atol=1e-10)
    whole.save(tmp_path / "norm.npz")
    loaded = features.load_feature_transform(tmp_path / "norm.npz")
    assert all(np.array_equal(getattr(loaded, f), getattr(whole, f)) for f in ("mean", "std", "pca_components"))
    assert loaded.n_samples == 700
    with pytest.raises(ValueError, match="already holds a PCA"):
        features.load_feature_transform(tmp_path / "norm.npz", tmp_path / "norm.npz")


def test_constant_dimension_and_errors(shared_data):
    x = correlated(200, 16)
    x[:, 3] = 1.5
    fitted = features.fit_feature_transform(x, 4)
    assert np.isfinite(fitted.pca_components).all() and not fitted.normalize(x)[:, 3].any()
    with pytest.raises(ValueError, match="needs more than 4 embeddings"):
        features.fit_feature_transform(x[:4], 4)
    with pytest.raises(ValueError, match="pass the PCA npz too"):
        features.load_feature_transform(shared_data / "reference/norm.npz")
