"""Linear probes: labels from GenBank qualifiers, metrics with intervals, grouped folds, the command."""
import gzip
import json
import pathlib
import re

import numpy as np
import pandas as pd
import pytest
from Bio import SeqIO

from glm_jax.analysis import labels, probes, tables
from glm_jax.cli.main import main
from helpers import composition_features, fails, model_tables, tiny_glm

PHAGE = pathlib.Path(__file__).resolve().parents[1] / "data/genomes/pharokka_SAOMS1_MW460250_standard.gbk.gz"


@pytest.fixture(scope="module")
def phage_tables():
    genes = tables.genome_gene_table([PHAGE])
    features = composition_features(genes["protein"])
    genes, _ = model_tables(genes, features, tiny_glm(features.shape[1] + 1))
    genes["esm2"] = list(features)  # composition stands in for ESM2 (real ESM2 takes minutes here)
    return genes


def test_phrog_probe_on_a_shipped_phage_reports_intervals(phage_tables):
    rows, y, classes = labels.probe_labels(phage_tables, "phrog")
    # 245 CDS, 154 "unknown function" left out; categories counted in shared/data/README
    assert len(rows) == 91 and "unknown function" not in classes and len(classes) == 7
    result = probes.run_probes(phage_tables, rows, y, classes, bootstrap=200)
    assert result["left_out_classes"] == ["transcription regulation"]  # 4 genes < 5 folds
    assert list(result["representations"]) == ["esm2", "embedding"]
    for entry in result["representations"].values():
        for metric in ("accuracy", "macro_f1"):
            low, high = entry["ci95"][metric]
            assert 0 <= low <= entry[metric] <= high <= 1 and high - low > 0.02
            assert len(entry["folds"][metric]) == 5
    table = probes.result_table(result)
    assert list(table["representation"]) == ["esm2", "embedding"] and "accuracy_ci95" in table


def test_probe_finds_signal_and_reports_chance_without_it():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    genes = pd.DataFrame({"esm2": list(np.eye(3)[y] + rng.normal(0, 0.3, (300, 3))),   # holds the label
                          "embedding": list(rng.normal(size=(300, 8)))})                 # holds nothing
    result = probes.run_probes(genes, np.arange(300), y, ["a", "b", "c"], bootstrap=200)
    informative, noise = result["representations"]["esm2"], result["representations"]["embedding"]
    assert informative["ci95"]["accuracy"][0] > 0.9
    chance = np.bincount(y).max() / len(y)
    assert noise["ci95"]["accuracy"][0] < chance + 0.02 and noise["accuracy"] < 0.45


def test_ec_class_and_prophage_labels_match_the_genbank_files(shared_data):
    ecoli = shared_data / "ecoli" / "GCF_000005845.2_ASM584v2_genomic.gbff.gz"
    with gzip.open(ecoli, "rt") as handle:  # independent count: first /EC_number of translated CDS
        digits = [f.qualifiers["EC_number"][0].split(".")[0] for r in SeqIO.parse(handle, "genbank")
                  for f in r.features if f.type == "CDS" and "translation" in f.qualifiers
                  and "EC_number" in f.qualifiers]
    rows, y, classes = labels.probe_labels(tables.genome_gene_table([ecoli]), "ec_class")
    expected = pd.Series([d for d in digits if d in "1234567" and d]).value_counts()
    assert dict(zip(classes, np.bincount(y))) == expected.to_dict()
    pyogenes = tables.genome_gene_table([shared_data / "genomes" / "Streptococcus_pyogenes_M1_GAS.gb.gz"])
    rows, y, classes = labels.probe_labels(pyogenes, "is_phage")
    assert classes == ["other", "phage"] and len(rows) == 1853 and y.sum() == 184  # PhiSpy's 184 prophage CDS


def test_probe_command_binary_task_and_grouped_folds(shared_data, tmp_path, capsys):
    genes = tables.genome_gene_table([shared_data / "genomes" / "Streptococcus_pyogenes_M1_GAS.gb.gz"])
    genes["esm2"] = list(composition_features(genes["protein"]))
    genes.drop(columns="protein").to_parquet(tmp_path / tables.GENES_FILE)
    assert main(["probe", "--tables", str(tmp_path), "--task", "is_phage", "--bootstrap", "100",
                 "--output", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "probe_is_phage.json").read_text())
    entry = result["representations"]["esm2"]
    assert 0.5 < entry["auroc"] <= 1 and entry["ci95"]["ap"][0] <= entry["ap"] <= entry["ci95"]["ap"][1]
    assert entry["ap"] > 184 / 1853  # above the positive rate
    assert "ap_ci95" in pd.read_csv(tmp_path / "out" / "probe_is_phage.tsv", sep="\t")
    line = fails(capsys, "probe", "--tables", tmp_path, "--task", "is_phage", "--group-by", "contig",
                 "--output", tmp_path / "grouped")
    assert re.search("grouped folds need >= 5 groups .* have 1", line), line
