"""The distinct proteins of a corpus, without holding them all: hash-partitioned spill files.

`ProteinSpill.add(sequence)` appends each protein to one of `num_partitions` partition files chosen
by a 64-bit hash of the sequence, so equal sequences always meet in the same partition; `close()`
deduplicates each partition alone, in memory (a dict of ~1/num_partitions of the corpus), writes
its distinct sequences in first-seen order, and returns a `ProteinSet` that reads them back
partition by partition.

Why hash partitions and not an external sort: both bound memory by one piece of the corpus, but a
sort needs log(n / run) merge passes over the whole spill and its output order (sorted by key) is
of no use here, while partitions need one write and one read, keep genome order within a
partition, and are natural units of work: host p of P embeds partitions q with q % P == p (their
sequences go to no other host, so no protein is embedded twice), and a lost host's partitions are
redone alone. The order of `ProteinSet` -- partitions in q order, each in first-seen (genome)
order -- does not depend on the number of hosts, so the normalisation fitted over it is the same
bit for bit in any run.

Memory: the spill buffers at most `buffer_bytes` of sequences (deduplicated per partition) before
appending them to their files; `close()` holds one partition. Disk: one line per distinct
sequence per buffer flush (at most the corpus's proteins once more).
"""
from __future__ import annotations

import json
import pathlib
from typing import Callable, Iterator, Sequence

from glm_jax import files
from glm_jax.data.id_hashes import hash64

DEFAULT_PARTITIONS = 256   # at 10^8 genes, ~3 x 10^5 sequences (~100 MB) per partition to deduplicate
DEFAULT_BUFFER_BYTES = 16 << 20
COUNTS_FILE = "distinct.json"


def partition_of(sequence: str, num_partitions: int) -> int:
    """The partition of a sequence: a stable 64-bit hash modulo `num_partitions`."""
    return hash64(sequence) % num_partitions


def _spill_name(q: int) -> str:
    return f"spill-{q:05d}.txt"


def _distinct_name(q: int) -> str:
    return f"distinct-{q:05d}.txt"


class ProteinSpill:
    """Writes the proteins of partitions `owned(q)` into `directory` (others are dropped: another
    host keeps them). Sequences are single lines of protein letters (never contain a newline)."""

    def __init__(self, directory: str | pathlib.Path, num_partitions: int = DEFAULT_PARTITIONS,
                 owned: Callable[[int], bool] = lambda q: True, buffer_bytes: int = DEFAULT_BUFFER_BYTES):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("*.txt"):  # an earlier, interrupted spill
            stale.unlink()
        self.num_partitions, self.owned, self.buffer_bytes = num_partitions, owned, buffer_bytes
        self.partitions = [q for q in range(num_partitions) if owned(q)]
        self._buffers: dict[int, dict[str, None]] = {}
        self._buffered = 0
        self.added = 0  # sequences given to add() that this spill keeps (repeats included)

    def add(self, sequence: str) -> None:
        q = partition_of(sequence, self.num_partitions)
        if not self.owned(q):
            return
        self.added += 1
        buffer = self._buffers.setdefault(q, {})
        if sequence not in buffer:
            buffer[sequence] = None
            self._buffered += len(sequence) + 1
            if self._buffered >= self.buffer_bytes:
                self._flush()

    def _flush(self) -> None:
        for q, sequences in self._buffers.items():
            with open(self.directory / _spill_name(q), "a") as handle:
                handle.write("".join(s + "\n" for s in sequences))
        self._buffers, self._buffered = {}, 0

    def close(self) -> "ProteinSet":
        """Deduplicates every owned partition (one at a time) and returns their set."""
        self._flush()
        counts = {}
        for q in self.partitions:
            spill = self.directory / _spill_name(q)
            distinct = dict.fromkeys(spill.read_text().splitlines()) if spill.is_file() else {}
            files.write_text_atomic(self.directory / _distinct_name(q), "".join(s + "\n" for s in distinct))
            counts[q] = len(distinct)
            spill.unlink(missing_ok=True)
        files.write_text_atomic(self.directory / COUNTS_FILE, json.dumps({"num_partitions": self.num_partitions,
                                                                          "counts": counts}))
        return ProteinSet([self.directory])


class ProteinSet:
    """Distinct proteins in the deduplicated partitions of one or more spill directories (one per
    host), read back lazily. Iterating yields every sequence, partitions in q order; `partitions()`
    yields one list per partition (what an embedder takes at a time); both can run again."""

    def __init__(self, directories: Sequence[str | pathlib.Path]):
        self.paths: dict[int, pathlib.Path] = {}
        self.counts: dict[int, int] = {}
        for directory in map(pathlib.Path, directories):
            meta = json.loads((directory / COUNTS_FILE).read_text())
            for q, count in meta["counts"].items():
                self.paths[int(q)], self.counts[int(q)] = directory / _distinct_name(int(q)), count
        self.order = sorted(self.paths)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def partitions(self) -> Iterator[list[str]]:
        for q in self.order:
            yield self.paths[q].read_text().splitlines()

    def __iter__(self) -> Iterator[str]:
        for partition in self.partitions():
            yield from partition

    def first(self) -> str | None:
        return next(iter(self), None)
