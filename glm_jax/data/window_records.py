"""Writing make-shards' windows: planned windows + embeddings + normalisation -> shard records.

`window_batch` builds every record field (shards.RECORD_KEYS) of a batch of windows;
`write_windows` streams a process's spilled windows (genome order) through it, batch by batch,
into the shards it owns: window -> shard `key % num_shards` of its split, each shard mixed by the
writer's bounded shuffle buffer (shards.ShardWriter). Memory: one batch of windows and their
embeddings, plus the shuffle buffers.
"""
from __future__ import annotations

import json
import pathlib
from typing import Protocol, Sequence

import numpy as np

from glm_jax.data import features, genomes, shards
from glm_jax.data.window_plan import SPLITS, PlannedWindow, WindowSpill
from glm_jax.data.windows import Window


class EmbeddingLookup(Protocol):
    """What make-shards needs from an embedding store."""

    def get(self, sequences: Sequence[str]) -> np.ndarray:
        """[n] protein sequences -> [n, D] float16 embeddings."""


def gene_labels_json(gene: genomes.Gene) -> bytes:
    """The gene's label qualifiers as compact JSON (b"" when it has none)."""
    return json.dumps(gene.label_dict, separators=(",", ":"), sort_keys=True).encode() if gene.labels else b""


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
    batch["prot_ids"] = np.where(rows >= 0, np.asarray(first_prot_ids)[:, None] + np.arange(max_genes)[None], 0)
    batch |= {"protein_hash": hashes, "strand": strands, "gene_ids": gene_ids, "gene_labels": gene_labels,
              "num_genes": np.array([len(w.genes) for w in windows]), "window_index": np.asarray(window_indices),
              "window_start": np.array([w.start for w in windows]),
              "contig_id": np.array([w.id.encode() for w in windows], object),
              "genome": np.array([w.source.encode() for w in windows], object)}
    return batch


def owned_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """The shards process p of P writes: p, p + P, ... (P divides num_shards)."""
    return list(range(process_index, num_shards, process_count))


def write_windows(out_dir: pathlib.Path, spill: WindowSpill, num_shards: dict[str, int], store: EmbeddingLookup,
                  transform: features.FeatureTransform, max_genes: int, dtype, *, seed: int, shuffle_buffer: int,
                  process_index: int = 0, process_count: int = 1, total: int | None = None,
                  progress: bool = True) -> dict[str, list[dict]]:
    """Writes the spilled windows into this process's shards -> {split: [stats of each owned shard]}."""
    from glm_jax.progress import Progress
    writers = {name: shards.ShardWriter(out_dir, name, count, shards=owned_shards(count, process_index, process_count),
                                        shuffle_buffer=shuffle_buffer, seed=seed)
               for name, count in num_shards.items()}
    try:
        with Progress(total=total, desc="write shards", unit="window", enabled=progress) as bar:
            for batch in spill.batches():
                for name in SPLITS:
                    planned: list[PlannedWindow] = [p for p in batch if p.split == name]
                    if not planned:
                        continue
                    records = window_batch([p.window for p in planned], np.array([p.first_prot_id for p in planned]),
                                           store, transform, max_genes, dtype, np.array([p.index for p in planned]))
                    writers[name].write(records, [p.key % num_shards[name] for p in planned])
                bar.update(len(batch))
    finally:
        stats = {name: writer.close() for name, writer in writers.items()}
    return stats
