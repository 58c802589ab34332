"""Shard write/read throughput: windows/s and MB/s of ShardWriter, ShardReader (tf.data, shuffled,
one epoch) and InMemoryWindows, for the paper's features (ESM2-650M: 1281-d) and the default
ESM2-8M features (321-d), 30-gene windows, 100-d labels, float16 records.

    python benchmarks/bench_shards.py [--windows 4000] [--batch 256]

Writes benchmarks/results/shards_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from glm_jax.data import shards

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MAX_GENES, NUM_PC = 30, 100


def windows(n: int, emb_dim: int, seed: int = 0) -> dict:
    """n realistic windows: 16-30 genes (the original's range), float16 features, string metadata."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, MAX_GENES + 1, n)
    mask = (np.arange(MAX_GENES)[None] < lengths[:, None]).astype(np.int64)
    return {
        "inputs_embeds": (rng.normal(size=(n, MAX_GENES, emb_dim)) * mask[..., None]).astype(np.float16),
        "labels": (rng.normal(size=(n, MAX_GENES, NUM_PC)) * mask[..., None]).astype(np.float16),
        "attention_mask": mask, "prot_ids": np.cumsum(mask).reshape(mask.shape) * mask,
        "protein_hash": rng.integers(-2 ** 62, 2 ** 62, (n, MAX_GENES)) * mask,
        "strand": rng.choice([-1, 1], (n, MAX_GENES)) * mask,
        "gene_ids": np.where(mask, "NP_414542.1", "").astype(object),
        "gene_labels": np.where(mask, '{"function":"tail"}', "").astype(object),
        "num_genes": lengths, "window_index": np.arange(n), "window_start": np.zeros(n, np.int64),
        "contig_id": np.array([f"NC_000913.3_{i}" for i in range(n)], object),
        "genome": np.array(["genome.gbff.gz"] * n, object),
    }


def bench(emb_dim: int, n: int, batch: int, num_shards: int) -> dict:
    data = windows(n, emb_dim)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with shards.ShardWriter(tmp, "train", num_shards) as writer:
            for i in range(0, n, 512):
                writer.write({k: v[i:i + 512] for k, v in data.items()})
        stats = writer.close()
        shards.write_dataset_info(tmp, {"emb_dim": emb_dim, "num_pc": NUM_PC, "max_genes": MAX_GENES, "dtype": "float16",
                                        "splits": {"train": {"num_windows": n, "shards": stats}}})
        write_s = time.perf_counter() - start
        size = sum(s["num_bytes"] for s in stats)
        reader = shards.ShardReader(tmp, batch, seed=0, num_epochs=2, drop_remainder=False)
        next(reader)  # tf.data graph construction is a one-off
        start = time.perf_counter()
        read = sum(len(b["window_index"]) for b in reader)
        read_s = time.perf_counter() - start
        memory = shards.InMemoryWindows(shards.read_shards(tmp), batch, seed=0, num_epochs=1, drop_remainder=False)
        start = time.perf_counter()
        in_memory = sum(len(b["window_index"]) for b in memory)
        memory_s = time.perf_counter() - start
    per_window = size / n
    return {"emb_dim": emb_dim, "windows": n, "shards": num_shards, "batch": batch, "bytes_per_window": round(per_window),
            "write_windows_per_s": n / write_s, "write_MB_per_s": size / write_s / 1e6,
            "read_windows_per_s": read / read_s, "read_MB_per_s": read * per_window / read_s / 1e6,
            "in_memory_windows_per_s": in_memory / memory_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=4000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--shards", type=int, default=8)
    args = p.parse_args()
    import tensorflow as tf
    runs = [bench(emb_dim, args.windows, args.batch, args.shards) for emb_dim in (1281, 321)]
    result = {"platform": "cpu", "cpu": platform.machine(), "cpu_count": os.cpu_count(), "tensorflow": tf.__version__,
              "note": "read = ShardReader (tf.data, per-shard full shuffle, float32 outputs), 2 epochs timed after the "
                      "first batch; page-cached files; write includes serialisation", "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shards_cpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
