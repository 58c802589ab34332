"""What the glm-jax benchmarks share: model sizes, synthetic windows, timing, result files."""
from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("USE_TF", "0")

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glm_jax.model.glm import GLMConfig  # noqa: E402

CONFIGS = {"tiny": GLMConfig(emb_dim=65, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                             max_position_embeddings=64, num_pc=20),
           "base": GLMConfig()}
GENES = 30
RESULTS = REPO / "benchmarks" / "results"


def windows(config: GLMConfig, size: int, seed: int = 0) -> dict:
    """Contigs of 15-30 genes padded to 30: inputs [b, 30, emb_dim], labels [b, 30, num_pc], mask [b, 30]."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(GENES)[None] < rng.integers(15, GENES + 1, size)[:, None]).astype(np.int32)
    return {"inputs_embeds": (rng.normal(size=(size, GENES, config.emb_dim)) * mask[..., None]).astype(np.float32),
            "labels": (rng.normal(size=(size, GENES, config.num_pc)) * mask[..., None]).astype(np.float32),
            "attention_mask": mask}


def seconds_per_call(fn, repeats: int) -> float:
    """Median wall time of `fn()` after one warm-up (compilation) call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def environment() -> dict:
    import torch
    return {"platform": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "device_count": jax.device_count(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "versions": {"jax": jax.__version__, "torch": torch.__version__}}


def write_results(name: str, results: dict) -> pathlib.Path:
    """Prints `results` and writes them to benchmarks/results/<name>_<platform>.json."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}_{jax.default_backend()}.json"
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return path
