"""64-bit hashes of names and keys, and a set of them that costs ~12 bytes per member.

Streaming readers must notice a contig id seen twice, or a FASTA id repeated, without holding every
name in a Python set (~100 bytes per short string). `SeenHashes` keeps the first occurrence's
64-bit hash in sorted numpy arrays (plus a small Python set of the newest), and an int32 tag saying
where it was seen, so the error can name both places. Two different names collide with
probability ~n^2 / 2^65 (10^7 names: 3e-6): an error that names a false duplicate is possible in
principle, never a duplicate missed.
"""
from __future__ import annotations

import hashlib

import numpy as np


def hash64(text: str) -> int:
    """The first 8 bytes of sha256(text) as an unsigned int (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


class SeenHashes:
    """`add(name, tag)` -> None when `name` is new, else the tag it was first added with."""

    MERGE_AT = 1 << 16  # newest hashes kept in a dict until this many, then merged into the arrays

    def __init__(self):
        self._sorted = np.zeros(0, np.uint64)
        self._tags = np.zeros(0, np.int32)
        self._recent: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def add(self, name: str, tag: int = 0) -> int | None:
        key = hash64(name)
        if key in self._recent:
            return self._recent[key]
        at = int(np.searchsorted(self._sorted, np.uint64(key)))
        if at < len(self._sorted) and int(self._sorted[at]) == key:
            return int(self._tags[at])
        self._recent[key] = tag
        if len(self._recent) >= self.MERGE_AT:
            self._merge()
        return None

    def _merge(self) -> None:
        keys = np.fromiter(self._recent.keys(), np.uint64, len(self._recent))
        tags = np.fromiter(self._recent.values(), np.int32, len(self._recent))
        keys, tags = np.concatenate([self._sorted, keys]), np.concatenate([self._tags, tags])
        order = np.argsort(keys, kind="stable")
        self._sorted, self._tags, self._recent = keys[order], tags[order], {}
