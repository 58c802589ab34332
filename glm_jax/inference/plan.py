"""Which windows `infer` runs, contig by contig as the genomes stream past.

Window rule. Each contig is cut into windows of `window` genes starting every `stride` genes
(default window // 2), the last window ending at the contig's last gene; a contig shorter than a
window is one padded window; no gene is ever dropped and no window crosses a contig. Each gene's
row comes from ONE window: the one in which it sits most central (nearest the window's middle;
ties -> the earlier window). So every value of a row is one real forward pass, and each gene away
from the contig ends has at least (window - stride) // 2 genes of context on either side.

Two passes over the contigs, neither holding more than one contig (plus the chunk being run):
`survey` counts genes, windows and chunks, finds the gene ids that repeat (8 bytes per gene: a
hash) and the label columns present; `planned_windows` then yields the windows in (contig, start)
order with each gene's run-unique id, and `chunks` groups them, `chunk_windows` at a time.
"""
from __future__ import annotations

import array
import dataclasses
import json
import pathlib
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from glm_jax.data import genomes


def window_bounds(num_genes: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[start, stop) of every window of a contig: starts 0, stride, ... up to the first window that
    reaches the last gene (whose start is pulled back so it is full when the contig allows)."""
    if num_genes <= window:
        return [(0, num_genes)]
    bounds, start = [], 0
    while True:
        if start + window >= num_genes:
            bounds.append((num_genes - window, num_genes))
            return bounds
        bounds.append((start, start + window))
        start += stride


def owners(bounds: Sequence[tuple[int, int]], positions: int) -> np.ndarray:
    """[positions] index of the window in which each position is most central (-1: in none);
    ties go to the earlier window."""
    best = np.full(positions, np.inf)
    owner = np.full(positions, -1)
    for k, (start, stop) in enumerate(bounds):
        p = np.arange(start, stop)
        distance = np.abs(p - (start + stop - 1) / 2)
        better = distance < best[p]
        best[p[better]], owner[p[better]] = distance[better], k
    return owner


class WindowedContig(NamedTuple):
    """A contig and the [start, stop) of its windows; `records` index shard windows (shards input)."""
    contig: genomes.Contig
    bounds: list[tuple[int, int]]
    records: list[int] | None = None


@dataclasses.dataclass(frozen=True)
class PlannedContig:
    contig: genomes.Contig
    gene_ids: tuple[str, ...]  # unique over the whole run ("" for a position without a gene)
    offset: int                # run-wide index of its first gene


@dataclasses.dataclass(frozen=True)
class PlannedWindow:
    """Genes [start, start + size) of `contig`; `owned` [size] bool marks the genes whose row this
    window gives (where they are most central). `record` indexes a shard window (-1: none)."""
    contig: PlannedContig
    start: int
    size: int
    owned: np.ndarray
    record: int = -1

    @property
    def genes(self) -> tuple[genomes.Gene, ...]:
        return self.contig.contig.genes[self.start:self.start + self.size]

    @property
    def global_start(self) -> int:
        """Run-wide index of the window's first gene (pairs are keyed by these)."""
        return self.contig.offset + self.start


def genome_windows(contigs: Iterable[genomes.Contig], window: int, stride: int) -> Iterator[WindowedContig]:
    for contig in contigs:
        yield WindowedContig(contig, window_bounds(len(contig.genes), window, stride))


@dataclasses.dataclass
class Survey:
    """What the first pass learns; a few bytes per chunk, and a set of the ids that repeat."""
    genes: int
    contigs: int
    windows: int
    chunk_starts: np.ndarray   # [chunks] run-wide index of the first gene of each chunk's first window
    label_keys: list[str]      # label qualifier columns, in genomes.LABEL_QUALIFIERS order
    repeated_ids: set[int]     # hash() of the gene ids that occur more than once

    @property
    def chunks(self) -> int:
        return len(self.chunk_starts)


def survey(windowed: Iterable[WindowedContig], chunk_windows: int,
           on_contig: Callable[[genomes.Contig], None] | None = None) -> Survey:
    """One pass over the contigs (`on_contig` sees each, e.g. to collect distinct proteins)."""
    genes = contigs = windows = 0
    chunk_starts, id_hashes, labels = array.array("q"), array.array("q"), set()
    for contig, bounds, _ in windowed:
        for k, (start, _) in enumerate(bounds):
            if (windows + k) % chunk_windows == 0:
                chunk_starts.append(genes + start)
        real = [g for g in contig.genes if g is not None]
        id_hashes.extend(hash(g.id) for g in real)
        labels.update(key for g in real for key, _ in g.labels)
        genes, contigs, windows = genes + len(contig.genes), contigs + 1, windows + len(bounds)
        if on_contig is not None:
            on_contig(contig)
    hashes, counts = np.unique(np.frombuffer(id_hashes, np.int64), return_counts=True)
    label_keys = [k for k in genomes.LABEL_QUALIFIERS if k in labels] + sorted(labels - set(genomes.LABEL_QUALIFIERS))
    return Survey(genes, contigs, windows, np.frombuffer(chunk_starts, np.int64).copy(), label_keys,
                  set(hashes[counts > 1].tolist()))


def planned_windows(windowed: Iterable[WindowedContig], survey: Survey) -> Iterator[PlannedWindow]:
    """Every window in (contig, start) order. Gene ids are unique over the run: a repeated id is
    suffixed `#2`, `#3`, ... in input order (the first keeps its id); only repeated ids are
    counted, so memory holds them and not every id."""
    seen: dict[str, int] = {}
    offset = 0
    for contig, bounds, records in windowed:
        ids = []
        for gene in contig.genes:
            if gene is None:
                ids.append("")
            elif hash(gene.id) in survey.repeated_ids:
                seen[gene.id] = seen.get(gene.id, 0) + 1
                ids.append(gene.id if seen[gene.id] == 1 else f"{gene.id}#{seen[gene.id]}")
            else:
                ids.append(gene.id)
        planned = PlannedContig(contig, tuple(ids), offset)
        owner = owners(bounds, len(contig.genes))
        for k, (start, stop) in enumerate(bounds):
            yield PlannedWindow(planned, start, stop - start, owner[start:stop] == k,
                                records[k] if records is not None else -1)
        offset += len(contig.genes)


def chunks(windows: Iterable[PlannedWindow], size: int) -> Iterator[tuple[int, list[PlannedWindow]]]:
    """(chunk number, its windows): consecutive groups of `size` windows (the last may be short)."""
    chunk: list[PlannedWindow] = []
    number = 0
    for window in windows:
        chunk.append(window)
        if len(chunk) == size:
            yield number, chunk
            chunk, number = [], number + 1
    if chunk:
        yield number, chunk


# --- make-shards output as input ----------------------------------------------------------------

def shard_windows(dataset_dir: str | pathlib.Path) -> tuple[list[WindowedContig], dict[str, np.ndarray]]:
    """Every window of a make-shards directory (all splits; held in memory) as windowed contigs,
    and the shard arrays. Contigs are rebuilt from the windows' `<contig>_<segment>` names and
    offsets; genes in no window (segments make-shards dropped as too short) are None (no row)."""
    from glm_jax.data import shards
    info = shards.load_dataset_info(dataset_dir)
    parts = [shards.read_shards(dataset_dir, split=split) for split in info["splits"]]
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keys = [(g.decode(), c.decode().rsplit("_", 1)[0]) for g, c in zip(arrays["genome"], arrays["contig_id"])]
    order = sorted(range(len(keys)), key=lambda i: (keys[i], int(arrays["window_start"][i])))
    contig_index: dict[tuple[str, str], int] = {}
    gene_slots: list[dict[int, genomes.Gene]] = []
    entries: list[list[tuple[int, int, int]]] = []
    for i in order:
        c = contig_index.setdefault(keys[i], len(contig_index))
        if c == len(gene_slots):
            gene_slots.append({})
            entries.append([])
        start, size = int(arrays["window_start"][i]), int(arrays["attention_mask"][i].sum())
        for j in range(size):
            labels = arrays["gene_labels"][i, j]
            gene_slots[c][start + j] = genomes.Gene(
                arrays["gene_ids"][i, j].decode(), "", int(arrays["strand"][i, j]), None, None, keys[i][1],
                labels=tuple(sorted(json.loads(labels).items())) if labels else ())
        entries[c].append((start, start + size, i))
    windowed = [WindowedContig(genomes.Contig(contig, source, tuple(slots.get(p) for p in range(max(slots) + 1))),
                               [(a, b) for a, b, _ in mine], [record for _, _, record in mine])
                for (source, contig), slots, mine in zip(contig_index, gene_slots, entries)]
    return windowed, arrays
