"""data_pipeline: `glm-jax make-shards` on a synthetic metagenome at growing sizes: peak RSS and speed.

For each --genes size, benchmarks/synthetic_metagenome.py writes a metagenome (protein FASTA +
contig table, the original's format, or GenBank with --format gbk: 30-120 residue proteins, a
third of them repeats) and `glm-jax make-shards` runs on it in a fresh process with a random
--esm2-layers x --esm2-dim ESM2 (default 1 x 256: embeddings of gLM-like width, a model cheap
enough that the pipeline, not the model, is measured) and a new embedding store. Recorded per
size: wall time of the whole command, the child's peak RSS (os.wait4's ru_maxrss, that process
alone), genes/s (items_per_s), distinct proteins/s and windows/s. --baseline REF runs the same
command with the code of commit REF (git archive) for comparison (ratio_vs_baseline = its time /
this time; its peak RSS in extra).

Then (unless --stages leaves it out) `glm-jax infer` runs on the same inputs in a fresh process
with make-shards' embedding store, so every protein is already embedded and infer's survey,
model, featurisation and table writing are what is measured. Its checkpoint is a tiny random gLM
(`make-checkpoint` child: emb_dim = embedding width + 1, 1 layer, hidden 32, make-shards'
normalization.npz beside it); options are infer's defaults (window 30, stride 15, 256 windows per
chunk, batch 32). Recorded as impl `infer`: wall time, the child's peak RSS, genes/s, windows/s.

`--embedder hash` replaces ESM2 by a stand-in that writes the same store (format 2, one part per
process) with embeddings drawn from a hash of each sequence: everything make-shards does but the
model's arithmetic, for corpora whose ESM2 time (even 1 x 256) would not fit the time at hand.
The child is then `python benchmarks/cases/data_pipeline.py hash-child MAKE-SHARDS-ARGS...`
(`hash-infer-child INFER-ARGS...` for infer: a protein missing from the store gets a hash row).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__":  # the hash child runs this file as a script
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from benchmarks import synthetic_metagenome  # noqa: E402
from benchmarks.recorder import REPO  # noqa: E402

CASE = "data_pipeline"


def add_arguments(parser) -> None:
    parser.add_argument("--genes", default="10000,100000", help="comma-separated corpus sizes in genes")
    parser.add_argument("--format", choices=("faa", "gbk"), default="faa")
    parser.add_argument("--esm2-dim", type=int, default=256, help="hidden size of the random ESM2")
    parser.add_argument("--esm2-layers", type=int, default=1)
    parser.add_argument("--workdir", type=pathlib.Path, help="where corpora and outputs go (default: a temporary folder)")
    parser.add_argument("--baseline", metavar="REF", help="also run the code of git commit REF on the same corpora")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds allowed per make-shards run")
    parser.add_argument("--embedder", choices=("esm2", "hash"), default="esm2",
                        help="hash: a stand-in for ESM2 that writes the same store without the model's arithmetic")
    parser.add_argument("--stages", default="make-shards,infer",
                        help="make-shards, or make-shards,infer (infer uses make-shards' store)")


def random_esm2(directory: pathlib.Path, hidden: int, layers: int) -> pathlib.Path:
    """A random ESM2 saved by transformers (the tests' tiny model, at `hidden` x `layers`)."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    import transformers
    torch.manual_seed(0)
    config = transformers.EsmConfig(vocab_size=33, hidden_size=hidden, num_hidden_layers=layers,
                                    num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                                    position_embedding_type="rotary", token_dropout=True, pad_token_id=1,
                                    mask_token_id=32, max_position_embeddings=1026, layer_norm_eps=1e-5)
    transformers.EsmModel(config, add_pooling_layer=False).eval().save_pretrained(directory)
    return directory


def corpus(workdir: pathlib.Path, genes: int, fmt: str) -> list[str]:
    """The make-shards inputs of a synthetic metagenome of `genes` genes (written once per workdir)."""
    folder = workdir / f"metagenome-{genes}-{fmt}"
    done = folder / "done"
    if not done.is_file():
        if fmt == "faa":
            synthetic_metagenome.write_faa(folder, genes)
        else:
            synthetic_metagenome.write_gbk(folder, genes)
        done.write_text("")
    if fmt == "faa":
        return [str(folder / "proteins.faa"), "--contig-table", str(folder / "contig_to_prots.tsv")]
    return [str(folder / "metagenome.gbk")]


def measure(command: list[str], env: dict, cwd: pathlib.Path, timeout: float) -> dict:
    """Runs `command` -> wall seconds, the child's peak RSS (bytes), exit status, its output tail."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-2000:]
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "returncode": child.returncode, "log": tail}


def baseline_tree(workdir: pathlib.Path, ref: str) -> pathlib.Path:
    """The glm_jax package of commit `ref`, unpacked (run with it as the working directory)."""
    tree = workdir / f"code-{ref}"
    if not (tree / "glm_jax").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "glm_jax"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def run(args, recorder) -> None:
    sizes = [1000] if args.quick else [int(g) for g in args.genes.split(",")]
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="glm-jax-data-pipeline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = random_esm2(workdir / f"esm2-{args.esm2_layers}x{args.esm2_dim}", args.esm2_dim, args.esm2_layers)
    if args.baseline and args.embedder == "hash":
        raise SystemExit("--baseline runs the old code's ESM2 path: use it with --embedder esm2")
    env = os.environ | {"USE_TF": "0", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""}
    for genes in sizes:
        inputs = corpus(workdir, genes, args.format)
        runs = {"this": (REPO, None)}
        if args.baseline:
            runs["baseline"] = (baseline_tree(workdir, args.baseline), args.baseline)
        results = {}
        for name, (cwd, ref) in runs.items():
            out = workdir / f"shards-{genes}-{args.format}-{args.embedder}-{name}"
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, "-m", "glm_jax.cli", "make-shards", *inputs, "--out", str(out),
                       "--esm2", str(model), "--no-progress"]
            if args.embedder == "hash":
                command[1:4] = [str(pathlib.Path(__file__).resolve()), "hash-child"]
            run_env = env | ({"PYTHONPATH": str(cwd)} if ref else {})
            results[name] = measure(command, run_env, cwd, args.timeout)
            results[name]["out"] = out
        result = results["this"]
        shapes = {"genes": genes, "format": args.format,
                  "esm2": f"{args.esm2_layers}x{args.esm2_dim}" if args.embedder == "esm2" else f"hash {args.esm2_dim}-d"}
        common = dict(case=CASE, config=f"{genes} genes", impl="make-shards", dtype="float16", shapes=shapes)
        if result["returncode"] != 0:
            recorder.record(**common, status="failed", reason=result["log"].strip().splitlines()[-1][:300])
        else:
            record_make_shards(recorder, common, result, results.get("baseline"), args.baseline)
            if "infer" in args.stages.split(","):
                record_infer(recorder, common | {"impl": "infer"},
                             run_infer(workdir, inputs, result["out"], model, args.embedder, env, args.timeout))
        for name, r in results.items():
            shutil.rmtree(r["out"], ignore_errors=True)


def record_make_shards(recorder, common: dict, result: dict, baseline: dict | None, ref: str | None) -> None:
    info = json.loads((result["out"] / "dataset_info.json").read_text())
    windows = sum(split["num_windows"] for split in info["splits"].values())
    distinct = info["normalization"]["n_samples"]
    seconds, genes = result["seconds"], common["shapes"]["genes"]
    extra = {"peak_rss_bytes": result["peak_rss_bytes"], "peak_rss_mb": round(result["peak_rss_bytes"] / 2 ** 20),
             "distinct_proteins": distinct, "windows": windows, "contigs": info["summary"]["genomes"]["contigs"],
             "proteins_per_s": distinct / seconds, "windows_per_s": windows / seconds}
    ratio = None
    if baseline is not None:
        extra["baseline_returncode"] = baseline["returncode"]
        if baseline["returncode"] == 0:
            ratio = baseline["seconds"] / seconds
            extra |= {"baseline_s": baseline["seconds"], "baseline_peak_rss_mb": round(baseline["peak_rss_bytes"] / 2 ** 20)}
    recorder.record(**common, median_s=seconds, min_s=seconds, max_s=seconds, repeats=1, items_per_s=genes / seconds,
                    items_unit="genes/s", baseline=f"make-shards at {ref}" if ref else None,
                    ratio_vs_baseline=ratio, status="ok", extra=extra)


def run_infer(workdir: pathlib.Path, inputs: list[str], shards: pathlib.Path, esm2: pathlib.Path, embedder: str,
              env: dict, timeout: float) -> dict:
    """`glm-jax infer` of `inputs` with a tiny random gLM fitted to `shards`' features and their
    embedding store, in a fresh process -> measure()'s dict + the manifest's summary."""
    checkpoint, out = shards.parent / f"{shards.name}-glm", shards.parent / f"{shards.name}-infer"
    for folder in (checkpoint, out):
        shutil.rmtree(folder, ignore_errors=True)
    made = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "make-checkpoint", str(shards),
                           str(checkpoint)], env=env, cwd=REPO, capture_output=True, text=True)
    if made.returncode != 0:
        return {"returncode": made.returncode, "log": made.stderr[-2000:]}
    command = [sys.executable, "-m", "glm_jax.cli", "infer", *inputs, "--checkpoint", str(checkpoint),
               "--store", str(shards / "embeddings"), "--esm2-model", str(esm2), "--output", str(out), "--no-progress"]
    if embedder == "hash":
        command[1:4] = [str(pathlib.Path(__file__).resolve()), "hash-infer-child"]
    result = measure(command, env, REPO, timeout)
    if result["returncode"] == 0:
        result["summary"] = json.loads((out / "manifest.json").read_text())["summary"]
    for folder in (checkpoint, out):
        shutil.rmtree(folder, ignore_errors=True)
    return result


def record_infer(recorder, common: dict, result: dict) -> None:
    if result["returncode"] != 0:
        recorder.record(**common, status="failed", reason=result["log"].strip().splitlines()[-1][:300])
        return
    seconds, summary = result["seconds"], result["summary"]
    extra = {"peak_rss_bytes": result["peak_rss_bytes"], "peak_rss_mb": round(result["peak_rss_bytes"] / 2 ** 20),
             "windows": summary["windows"], "contigs": summary["contigs"], "genes_per_s": summary["genes"] / seconds,
             "windows_per_s": summary["windows"] / seconds, "model": TINY_GLM}
    recorder.record(**common, median_s=seconds, min_s=seconds, max_s=seconds, repeats=1,
                    items_per_s=summary["genes"] / seconds, items_unit="genes/s", status="ok", extra=extra)


TINY_GLM = dict(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=32,
                max_genes=30)


def make_checkpoint(shards: str, directory: str) -> int:
    """A random gLM of TINY_GLM's shape for make-shards output `shards` (emb_dim = its embedding
    width + 1, num_pc its PCA's), with its normalization.npz, in `directory`."""
    from glm_jax.data import features
    from glm_jax.model import checkpoint
    from glm_jax.model.glm import GLMConfig, create_model
    transform = features.load_feature_transform(pathlib.Path(shards) / "normalization.npz")
    config = GLMConfig(emb_dim=transform.mean.shape[0] + 1, num_pc=transform.num_pc, **TINY_GLM)
    checkpoint.save_model(directory, create_model(config, seed=0))
    shutil.copy(pathlib.Path(shards) / "normalization.npz", pathlib.Path(directory) / "normalization.npz")
    return 0


class HashEmbed:
    """make-shards' `embed` without a model: float16 rows drawn from a hash of each sequence,
    written to a real embedding store at `store_dir` (this process's part), as Esm2Embed does."""

    def __init__(self, store_dir, dim: int, writer: str | None = None):
        self.store_dir, self.dim, self.writer = store_dir, dim, writer

    def rows(self, sequences) -> "np.ndarray":
        import hashlib

        import numpy as np
        seeds = [int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little") for s in sequences]
        return np.stack([np.random.default_rng(seed).normal(size=self.dim) for seed in seeds]).astype(np.float16)

    def __call__(self, sequences):
        from glm_jax.proteins.store import DEFAULT_WRITER, EmbeddingStore
        store = EmbeddingStore(self.store_dir, model={"dim": self.dim, "fingerprint": "hash", "layer": None})
        chunk = []
        with store.writing(self.writer or DEFAULT_WRITER):
            for sequence in sequences:
                chunk.append(sequence)
                if len(chunk) == 4096:
                    store.add(chunk, self.rows(chunk))
                    chunk = []
            if chunk:
                store.add(chunk, self.rows(chunk))
        return store

    def open(self):
        from glm_jax.proteins.store import EmbeddingStore
        return EmbeddingStore(self.store_dir)


def hash_child(argv: list[str]) -> int:
    """`glm-jax make-shards ARGV` with `HashEmbed` in place of ESM2 (of --esm2's hidden size)."""
    from glm_jax.cli import main as cli
    from glm_jax.data import make_shards

    def embedder(model_dir, store_dir, *, writer=None, **_):
        dim = json.loads((pathlib.Path(model_dir) / "config.json").read_text())["hidden_size"]
        return HashEmbed(store_dir, dim, writer), {"esm2": {"model_dir": "hash stand-in", "store": str(store_dir)}}

    make_shards.esm2_embedder = embedder
    return cli.main(["make-shards", *argv])


def hash_infer_child(argv: list[str]) -> int:
    """`glm-jax infer ARGV` with the proteins looked up in the store; any missing one gets a
    `HashEmbed` row (make-shards' hash store holds them all)."""
    from glm_jax.cli import main as cli
    from glm_jax.inference import inputs
    from glm_jax.proteins.store import EmbeddingStore

    def embed_distinct(proteins, esm2_dir, store_dir, info, process, processes, progress, log):
        store = EmbeddingStore(store_dir)
        missing = store.missing(proteins)
        if missing:
            HashEmbed(store_dir, store.embedding_dim, f"p{process:05d}")(missing)
        log(f"hash stand-in: {len(missing)} proteins missing from {store_dir}, embedded")
        return EmbeddingStore(store_dir)

    inputs.embed_distinct = embed_distinct
    return cli.main(["infer", *argv])


CHILDREN = {"hash-child": hash_child, "hash-infer-child": hash_infer_child,
            "make-checkpoint": lambda argv: make_checkpoint(*argv)}

if __name__ == "__main__" and sys.argv[1:2] and sys.argv[1] in CHILDREN:
    sys.exit(CHILDREN[sys.argv[1]](sys.argv[2:]))
