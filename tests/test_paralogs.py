"""Hypotheses and their nearest real genes, on a small corpus with planted answers."""
import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

from glm_jax.analysis import paralogs, tables
from glm_jax.cli.main import main
from glm_jax.data.features import fit_feature_transform


@pytest.fixture
def corpus():
    """40 genes with 12-d embeddings and a 5-PC transform; gene i's most probable hypothesis is its
    own label, the second is gene (i + 7) % 40's label plus a little noise (a planted paralog)."""
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(40, 12)).astype(np.float16)
    transform = fit_feature_transform([embeddings], num_components=5)
    labels = transform.project(transform.normalize(embeddings))
    own = np.concatenate([labels, np.full((40, 1), 0.5)], 1)
    paralog = np.roll(own, -7, axis=0) + rng.normal(0, 0.01, own.shape)
    far = own + 50.0
    hypotheses = np.stack([paralog, far, own], 1)   # stored order is not probability order
    probabilities = np.tile([0.3, 0.1, 0.6], (40, 1))
    genes = pd.DataFrame({"gene_id": [f"g{i}" for i in range(40)], "product": [f"protein {i}" for i in range(40)],
                          "esm2": list(embeddings.astype(np.float32)),
                          "hypotheses": list(hypotheses.reshape(40, -1).astype(np.float32)),
                          "probabilities": list(probabilities.astype(np.float32))})
    return genes, transform, labels, hypotheses


def test_nearest_genes_recover_self_and_planted_paralog(corpus):
    genes, transform, labels, hypotheses = corpus
    table = paralogs.nearest_genes(genes, transform, top_hypotheses=2, neighbours=3)
    assert len(table) == 40 * 2 * 3
    best = table[table["neighbour_rank"] == 1].set_index(["gene_id", "hypothesis_rank"])
    for i in range(40):
        first, second = best.loc[(f"g{i}", 1)], best.loc[(f"g{i}", 2)]
        assert first["probability"] == pytest.approx(0.6) and first["is_self"] and first["distance"] < 1e-3
        assert second["neighbour_gene_id"] == f"g{(i + 7) % 40}" and second["neighbour_product"] == f"protein {(i + 7) % 40}"
    # distances against scipy on the float32 hypotheses (orientation column dropped)
    stored = np.stack(genes["hypotheses"]).reshape(40, 3, -1).astype(np.float64)
    expected = cdist(stored[:, 0, :-1], labels)  # hypothesis index 0 = the paralog, rank 2
    rows = table[(table["hypothesis_rank"] == 2)]
    got = rows.pivot(index="gene_id", columns="neighbour_rank", values="distance").loc[[f"g{i}" for i in range(40)]]
    np.testing.assert_allclose(got.to_numpy(), np.sort(expected, 1)[:, :3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows.groupby("gene_id", sort=False)["distance_to_self"].first().to_numpy(),
                               np.linalg.norm(stored[:, 0, :-1] - labels, axis=1), rtol=1e-5)


def test_hypotheses_command_writes_a_table_and_rejects_a_foreign_transform(corpus, tmp_path):
    genes, transform, _, _ = corpus
    genes.assign(contig="c", position=range(40)).to_parquet(tmp_path / tables.GENES_FILE)
    transform.save(tmp_path / "transform.npz")
    assert main(["hypotheses", "--tables", str(tmp_path), "--feature-transform", str(tmp_path / "transform.npz"),
                 "--gene-id", "g3", "--gene-id", "g5", "--top", "1", "--output", str(tmp_path / "h.tsv")]) == 0
    written = pd.read_csv(tmp_path / "h.tsv", sep="\t")
    assert list(written["gene_id"].unique()) == ["g3", "g5"] and len(written) == 2 * 5
    other = fit_feature_transform([np.random.default_rng(1).normal(size=(50, 16))], num_components=5)
    with pytest.raises(tables.FeatureWidthError, match="transform is for 16-d embeddings, .* esm2 column is 12-d"):
        paralogs.nearest_genes(genes, other)


def test_inference_columns_masked_hypotheses_and_model_labels_are_preferred(corpus):
    """Inference tables carry the model's own labels (`label_embedding`) and, with each gene masked,
    `context_hypotheses`/`context_probabilities`: used first, no feature transform needed."""
    genes, transform, labels, _ = corpus
    expected = paralogs.nearest_genes(genes, transform, neighbours=2)
    label_embedding = list(np.concatenate([labels, np.full((40, 1), 0.5)], 1).astype(np.float32))
    unmasked = genes.assign(hypotheses=list(np.zeros((40, 18), np.float32)))  # would point elsewhere
    masked = unmasked.assign(label_embedding=label_embedding, context_hypotheses=genes["hypotheses"],
                             context_probabilities=genes["probabilities"])
    got = paralogs.nearest_genes(masked, None, neighbours=2)
    pd.testing.assert_frame_equal(got, expected, atol=1e-5)  # float32 label_embedding vs float64 labels
    with pytest.raises(tables.TableError, match="no label_embedding column: pass the feature transform"):
        paralogs.nearest_genes(genes, None)
