"""Contig windows: the gene runs gLM sees as one sequence.

Default = the original's rule (`contigs_to_prots` in gLM's glm_utils.py): a contig of n genes is
cut into consecutive segments of `size` (30) genes, the last holding the remainder, and a segment
is kept only if it has more than size/2 genes (>= 16 of 30). `iter_windows` cuts one contig at a time (streaming); `contig_windows` a list of them. Options: `stride` < `size` gives
overlapping windows (the last window of a contig is the first one that reaches its end), and
`min_genes` replaces the size/2 rule. Short segments are counted and reported, not dropped silently.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

from glm_jax.data.genomes import Contig, Gene
from glm_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class WindowConfig:
    size: int = 30           # maximum genes per window (the model's sequence length)
    min_genes: int | None = None  # keep windows with >= this many genes; None: > size/2, as the original
    stride: int | None = None     # gene offset between window starts; None: size (no overlap)

    @property
    def minimum(self) -> int:
        return self.size // 2 + 1 if self.min_genes is None else self.min_genes

    @property
    def step(self) -> int:
        return self.size if self.stride is None else self.stride

    def __post_init__(self):
        if self.size < 1 or not 1 <= self.step <= self.size or not 1 <= self.minimum <= self.size:
            raise InputError(f"need 1 <= stride <= size and 1 <= min_genes <= size, got {self}")


@dataclasses.dataclass(frozen=True)
class Window:
    """Genes [start, start + len(genes)) of a contig; `index` numbers the contig's segments as the
    original does (`<contig>_<index>`)."""
    source: str
    contig: str
    index: int
    start: int
    genes: tuple[Gene, ...]

    @property
    def id(self) -> str:
        return f"{self.contig}_{self.index}"


@dataclasses.dataclass
class WindowReport:
    contigs: int = 0
    windows: int = 0
    genes_in_windows: int = 0
    short_segments: int = 0        # segments below the minimum, dropped
    genes_not_covered: int = 0     # genes in no kept window
    contigs_without_window: list[str] = dataclasses.field(default_factory=list)  # the first EXAMPLES of them
    num_contigs_without_window: int = 0

    EXAMPLES = 20

    def summary(self) -> dict:
        out = dataclasses.asdict(self)
        del out["num_contigs_without_window"]
        out["contigs_without_window"] = self.num_contigs_without_window
        out["contigs_without_window_examples"] = self.contigs_without_window[:self.EXAMPLES]
        return out


def segment_bounds(num_genes: int, config: WindowConfig) -> list[tuple[int, int]]:
    """All candidate segments [start, stop) of a contig, kept or not: starts 0, stride, 2*stride, ...
    up to the first segment that reaches the contig's end. With stride == size this is the
    original's n // size + 1 segments minus a trailing empty one."""
    bounds = []
    for start in range(0, max(num_genes, 1), config.step):
        stop = min(start + config.size, num_genes)
        bounds.append((start, stop))
        if stop == num_genes:
            break
    return [(a, b) for a, b in bounds if b > a]


def contig_windows(contigs: Iterable[Contig], config: WindowConfig = WindowConfig()) -> tuple[list[Window], WindowReport]:
    """Windows of every contig in input order, and what was dropped as too short."""
    report = WindowReport()
    windows = [w for contig in contigs for w in iter_windows(contig, config, report)]
    return windows, report


def iter_windows(contig: Contig, config: WindowConfig, report: WindowReport) -> Iterator[Window]:
    """The kept windows of one contig, in order; counts them and what was dropped into `report`."""
    covered = set()
    report.contigs += 1
    kept = 0
    for index, (start, stop) in enumerate(segment_bounds(len(contig.genes), config)):
        if stop - start < config.minimum:
            report.short_segments += 1
            continue
        kept += 1
        report.windows += 1
        report.genes_in_windows += stop - start
        covered.update(range(start, stop))
        yield Window(contig.source, contig.id, index, start, contig.genes[start:stop])
    report.genes_not_covered += len(contig.genes) - len(covered)
    if not kept:
        report.num_contigs_without_window += 1
        if len(report.contigs_without_window) < report.EXAMPLES:
            report.contigs_without_window.append(f"{contig.source}:{contig.id} ({len(contig.genes)} genes)")
