"""Peak host memory of gLM-base width on one long contig with clipped distances (issue 9).

    python benchmarks/long_contig_memory.py [--genes 16384] [--layers 1] [--attention blockwise]

Builds a gLM of the base model's width (emb_dim 1281, hidden 1280, 10 heads, MLP 3072; the
distance table of the original, max_position_embeddings 512, with `clip_distances`), runs the
jitted forward pass (last hidden state, predictions) on one contig of `--genes` genes and reports
the process's peak resident set size (`resource.getrusage`, which includes Python, jaxlib and the
parameters). Only implementations that never hold [genes, genes] arrays fit (`blockwise`, `pallas`
on GPU): the reference would gather a [genes, genes, 128] float32 tensor (137 GB at 16,384 genes)
and xla_shifted / fused hold [heads, genes, 2 x genes] scores (21 GB). No PyTorch import, so the
number is the model's. Appends one JSON line to benchmarks/results/long_contig_memory_<platform>.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import sys
import time

os.environ.setdefault("USE_TF", "0")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.recorder import cpu_model  # noqa: E402
from glm_jax.model.glm import GLMConfig, count_parameters, create_model  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--genes", type=int, default=16_384)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--attention", default="blockwise")
    args = parser.parse_args()
    config = GLMConfig(num_layers=args.layers, attention=args.attention, clip_distances=True,
                       max_genes=args.genes)
    model = create_model(config)
    inputs = jnp.asarray(np.random.default_rng(0).normal(size=(1, args.genes, config.emb_dim)).astype(np.float32))
    mask = jnp.ones((1, args.genes), jnp.float32)
    rss_before = peak_rss_mib()

    @nnx.jit
    def forward(model, inputs, mask):
        out = model(inputs, mask)
        return out.last_hidden_state, out.predictions

    start = time.perf_counter()
    hidden, _ = jax.block_until_ready(forward(model, inputs, mask))
    seconds = time.perf_counter() - start
    assert bool(jnp.isfinite(hidden).all())
    result = {
        "benchmark": "long_contig_memory", "genes": args.genes, "layers": args.layers,
        "attention": args.attention, "clip_distances": True, "hidden": config.hidden_size,
        "heads": config.num_heads, "max_position_embeddings": config.max_position_embeddings,
        "parameters": count_parameters(model), "compute_dtype": config.compute_dtype,
        "peak_rss_mib_before_forward": round(rss_before, 1), "peak_rss_mib": round(peak_rss_mib(), 1),
        "first_call_seconds_incl_compile": round(seconds, 1), "platform": jax.default_backend(),
        "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 1), "jax": jax.__version__,
    }
    print(json.dumps(result))
    path = REPO / "benchmarks" / "results" / f"long_contig_memory_{jax.default_backend()}.jsonl"
    path.parent.mkdir(exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
