"""Planning make-shards: genomes -> windows with their split, place in the split and shard key,
streamed once, one contig at a time.

Every process reads every genome (reading is cheap next to embedding), so each knows, with no
message to the others, every window's split, its `window_index` (place in its split, genome
order) and `first_prot_id` (the original's running gene counter over the split, genome order):
the same numbers as a single process. A window's shard is chosen by `window_key`, a 64-bit hash of
(seed, genome, window id), modulo the split's shard count; process p of P handles the windows
whose key % P == p, which are exactly those of its shards s = p, p + P, ... because P divides the
shard counts. The windows it handles are written, in genome order, to a spill file
(`WindowSpill`, pickled batches) and the proteins of every window go to `protein_set.ProteinSpill`
(which keeps this process's partitions).
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import pickle
from typing import Iterator, Sequence

from glm_jax.data import genomes
from glm_jax.data.id_hashes import hash64
from glm_jax.data.protein_set import ProteinSpill
from glm_jax.data.windows import Window, WindowConfig, WindowReport, iter_windows

SPLITS = ("train", "eval")


def split_of(window: Window, eval_fraction: float, split_by: str = "contig") -> str:
    """"eval" when a hash of the window's genome + contig (+ segment, split_by="window") falls
    below eval_fraction: deterministic, and independent of the other contigs in the corpus."""
    key = f"{window.source}\t{window.contig}" + (f"\t{window.index}" if split_by == "window" else "")
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2.0 ** 64
    return "eval" if u < eval_fraction else "train"


def window_key(window: Window, seed: int) -> int:
    """The 64-bit hash that places a window: shard = key % num_shards, process = key % processes."""
    return hash64(f"{seed}\t{window.source}\t{window.id}")


@dataclasses.dataclass(frozen=True)
class PlannedWindow:
    window: Window
    split: str
    index: int           # window_index: place in its split, genome order
    first_prot_id: int   # running 1-based gene counter of its first gene over the split
    key: int             # window_key


@dataclasses.dataclass
class Plan:
    """What the planning pass counted over the whole corpus (identical on every process)."""
    genomes: dict
    windows: dict
    split_windows: dict[str, int]
    split_genes: dict[str, int]
    planned_here: int = 0  # windows this process handles

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class WindowSpill:
    """This process's planned windows on disk, in genome order, pickled in batches."""

    BATCH = 1024

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)

    def writer(self) -> "_SpillWriter":
        return _SpillWriter(self.path, self.BATCH)

    def batches(self) -> Iterator[list[PlannedWindow]]:
        with open(self.path, "rb") as handle:
            while True:
                try:
                    yield pickle.load(handle)
                except EOFError:
                    return


class _SpillWriter:
    def __init__(self, path: pathlib.Path, batch: int):
        self.handle, self.batch, self.pending = open(path, "wb"), batch, []

    def add(self, planned: PlannedWindow) -> None:
        self.pending.append(planned)
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            pickle.dump(self.pending, self.handle, protocol=pickle.HIGHEST_PROTOCOL)
            self.pending = []

    def close(self) -> None:
        self.flush()
        self.handle.close()


def plan_windows(genome_paths: Sequence[str | pathlib.Path], spill: WindowSpill, proteins: ProteinSpill, *,
                 window: WindowConfig, eval_fraction: float, split_by: str, seed: int,
                 contig_table: str | pathlib.Path | None = None, unknown: str = "error",
                 process_index: int = 0, process_count: int = 1, progress: bool = True) -> Plan:
    """One streaming pass over the genomes (see the module docstring); raises the readers' errors
    (bad input) before anything but the spills is written."""
    from glm_jax.progress import Progress
    read, cut = genomes.ReadReport(), WindowReport()
    windows = {name: 0 for name in SPLITS}
    genes = {name: 0 for name in SPLITS}
    here = 0
    writer = spill.writer()
    try:
        contigs = genomes.iter_contigs(genome_paths, contig_table, unknown, read)
        for contig in Progress(contigs, desc="plan windows", unit="contig", enabled=progress):
            for w in iter_windows(contig, window, cut):
                split = split_of(w, eval_fraction, split_by)
                key = window_key(w, seed)
                if key % process_count == process_index:
                    writer.add(PlannedWindow(w, split, windows[split], genes[split] + 1, key))
                    here += 1
                windows[split] += 1
                genes[split] += len(w.genes)
                for gene in w.genes:
                    proteins.add(gene.protein)
    finally:
        writer.close()
    return Plan(read.summary(), cut.summary(), windows, genes, here)
