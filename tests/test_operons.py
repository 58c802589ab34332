"""Operon prediction: the original's coefficients, the baselines on E. coli, label joins, and that
an untrained model's attention does not beat the baselines."""
import json

import numpy as np
import pandas as pd
import pytest

from glm_jax.analysis import labels, operons, tables
from glm_jax.cli.main import main
from helpers import composition_features, model_tables, tiny_glm, tiny_glm_config

ECOLI = "ecoli/GCF_000005845.2_ASM584v2_genomic.gbff.gz"


@pytest.fixture(scope="module")
def ecoli_genes(shared_data):
    return tables.genome_gene_table([shared_data / ECOLI])


def test_original_predictor_gives_sklearn_probabilities(shared_data):
    from sklearn.linear_model import LogisticRegression

    path = shared_data / "reference" / "operon_predictor.npz"
    predictor = operons.load_predictor(path)
    with np.load(path) as f:
        reference = LogisticRegression()
        reference.coef_, reference.intercept_, reference.classes_ = f["coef_"], f["intercept_"], f["classes_"]
    # attention sums A[i,i+1] + A[i+1,i] lie in [0, 2]; the 190 = 19 layers x 10 heads of gLM-base
    features = np.random.default_rng(0).uniform(0, 2, (300, 190)) ** 3
    np.testing.assert_allclose(predictor.probabilities(features), reference.predict_proba(features)[:, 1],
                               rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="190 features"):
        predictor.probabilities(features[:, :40])  # the features of a 4-layer x 10-head model


def test_fit_folds_the_scaling_into_the_coefficients(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    x = rng.normal([300.0, 2.0, 0.5], [500.0, 1.0, 0.5], (400, 3))
    y = (x[:, 0] / 500 - x[:, 2] + rng.normal(0, 0.5, 400) < 0.3).astype(int)
    model = operons.fit_logistic(x, y, "distance_strand")
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000)).fit(x, y)
    np.testing.assert_allclose(model.probabilities(x), pipeline.predict_proba(x)[:, 1], atol=1e-6)
    model.save(tmp_path / "p.npz")
    loaded = operons.load_predictor(tmp_path / "p.npz")
    assert loaded.feature_set == "distance_strand"
    np.testing.assert_array_equal(loaded.probabilities(x), model.probabilities(x))


def test_block_folds_are_contiguous_and_balanced():
    folds = operons.block_folds(4297, 5)
    assert (np.diff(folds) >= 0).all() and sorted(np.bincount(folds)) == [859, 859, 859, 860, 860]


def test_distance_strand_baseline_on_ecoli(ecoli_genes, shared_data, tmp_path):
    report, scores = operons.evaluate(ecoli_genes, shared_data / "ecoli" / "operons.tsv")
    # 4,298 translated CDS -> 4,297 neighbour pairs; 1,741 same-operon pairs (data README, counted there)
    assert (report["pairs"], report["positive_pairs"]) == (4297, 1741)
    entry = report["feature_sets"]["distance_strand"]
    assert 0.8 < entry["ap"] < 0.95, entry  # measured 0.870; chance is 0.405
    assert len(entry["folds"]) == 5 and min(entry["folds"]) > 0.75
    # the same AP from the definition, sum over thresholds of (recall step) * precision, tied
    # scores forming one threshold (the clipped distance makes many ties)
    score, label = scores["distance_strand"].to_numpy(), scores["label"].to_numpy()
    thresholds = np.unique(score)[::-1]
    tp = np.array([label[score >= t].sum() for t in thresholds])
    predicted = np.array([(score >= t).sum() for t in thresholds])
    recall_steps = np.diff(np.concatenate([[0], tp])) / label.sum()
    assert (recall_steps * tp / predicted).sum() == pytest.approx(entry["ap"], abs=1e-9)


def test_evaluate_command_writes_report_and_plot(shared_data, tmp_path):
    genome = shared_data / ECOLI
    assert main(["operons", "evaluate", "--genome", str(genome), "--labels", str(shared_data / "ecoli/operons.tsv"),
                 "--output", str(tmp_path / "out"), "--folds", "3"]) == 0
    report = json.loads((tmp_path / "out" / "operons.json").read_text())
    assert set(report["feature_sets"]) == {"distance_strand"} and len(report["feature_sets"]["distance_strand"]["folds"]) == 3
    assert (tmp_path / "out" / "operons_pr.png").stat().st_size > 10_000
    assert main(["operons", "fit", "--genome", str(genome), "--labels", str(shared_data / "ecoli/operons.tsv"),
                 "--features", "distance_strand", "--output", str(tmp_path / "p.npz")]) == 0
    assert main(["operons", "predict", "--genome", str(genome), "--predictor", str(tmp_path / "p.npz"),
                 "--output", str(tmp_path / "pairs.tsv")]) == 0
    predicted = pd.read_csv(tmp_path / "pairs.tsv", sep="\t")
    assert len(predicted) == 4297 and predicted["probability"].between(0, 1).all()
    assert not list(tmp_path.glob("**/*.tmp"))


def test_labels_that_do_not_match_the_genome_are_rejected(ecoli_genes, shared_data, tmp_path):
    table = pd.read_csv(shared_data / "ecoli" / "operons.tsv", sep="\t", dtype=str, keep_default_na=False)
    pairs = tables.adjacent_pairs(ecoli_genes)
    shifted = table.assign(start=table["start"].astype(int) + 3)  # another assembly version's coordinates
    shifted.to_csv(tmp_path / "shifted.tsv", sep="\t", index=False)
    with pytest.raises(labels.LabelsMismatchError, match="shifted.tsv: no row for 4298 of 4298 genes"):
        labels.operon_pair_labels(ecoli_genes, pairs, tmp_path / "shifted.tsv")
    table.drop(columns="operon_id").to_csv(tmp_path / "no_operon.tsv", sep="\t", index=False)
    with pytest.raises(labels.LabelsMismatchError, match="no_operon.tsv: no 'operon_id' column"):
        labels.operon_pair_labels(ecoli_genes, pairs, tmp_path / "no_operon.tsv")
    phage = tables.genome_gene_table([shared_data / "genomes" / "Streptococcus_pyogenes_M1_GAS.gb.gz"])
    with pytest.raises(labels.LabelsMismatchError, match="operons.tsv: the genome's genes have no locus_tag"):
        labels.operon_pair_labels(phage, tables.adjacent_pairs(phage), shared_data / "ecoli" / "operons.tsv")


def test_untrained_attention_does_not_beat_the_baselines(ecoli_genes, shared_data):
    genes = ecoli_genes.iloc[:450]  # 15 windows of E. coli
    features = composition_features(genes["protein"])
    model_genes, pairs = model_tables(genes, features, tiny_glm(features.shape[1] + 1, num_layers=2, num_heads=4))
    model_genes["esm2"] = list(features)  # composition stands in for ESM2 in the cosine baseline
    summed = operons.LogisticModel(np.ones(8), -1.0)  # 2 layers x 4 heads; score = total attention
    report, scores = operons.evaluate(model_genes, shared_data / "ecoli" / "operons.tsv", attention_pairs=pairs,
                                      predictor=summed)
    ap = {name: entry["ap"] for name, entry in report["feature_sets"].items()}
    assert report["pairs"] == 449 and set(ap) == {"distance_strand", "esm2_cosine", "glm_attention", "predictor"}
    assert ap["glm_attention"] < ap["distance_strand"] - 0.1, ap
    total = np.stack(pairs.set_index("gene_id_a").loc[scores["gene_id_a"], "attention"]).sum(1)
    np.testing.assert_allclose(scores["predictor"], 1 / (1 + np.exp(1.0 - total)), rtol=1e-6)


def test_checkpoint_for_another_protein_model_is_rejected(tmp_path):
    from glm_jax.model.checkpoint import CONFIG_FILE

    (tmp_path / "model").mkdir()  # the config is all the check reads
    (tmp_path / "model" / CONFIG_FILE).write_text(json.dumps(tiny_glm_config(33).to_dict()))
    tables.check_feature_width(tmp_path / "model", 32, "ESM2 here")
    with pytest.raises(tables.FeatureWidthError, match="model: model emb_dim 33 needs 32-d .* ESM2-8M gives 320-d"):
        tables.check_feature_width(tmp_path / "model", 320, "ESM2-8M")
