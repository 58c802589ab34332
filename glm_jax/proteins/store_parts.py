"""One part of the embedding store: the files a single writer appends to, and how they are read.

The store's layout and the reasons for it are in glm_jax/proteins/store.py and
docs/embedding-store.md. Here: the 128-bit sequence keys, the sorted hash index in 4 KiB blocks
with in-memory fences, row reads by `pread`, the appending `PartWriter` (one flock'ed live writer
per part), and the chunks of a format-1 store read as if they were one part.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
import socket
from typing import Iterable, Sequence

import numpy as np

from glm_jax import files
from glm_jax.errors import InputError


FORMAT = 2
MANIFEST = "manifest.json"
PARTS = "parts"
PART_INFO = "part.json"
KEYS_FILE = "keys.u64"
EMBEDDINGS_FILE = "embeddings.f16"
LOCK_FILE = "writer.lock"
BLOCK_WORDS = 512  # uint64 words per index block: one 4 KiB page, holding 170 (high, low, row) entries
LOOKUP_BATCH = 8192  # queries whose index blocks one lookup holds at once (32 MiB)
TAIL_ROWS = 1 << 20  # unindexed rows a writer keeps (16 MiB of hashes) before folding them into the index
IDENTITY_FIELDS = ("fingerprint", "config", "layer", "dim", "compute_dtype", "max_residues")
DEFAULT_WRITER = "p00000"
FORMAT1_PART = "format1"  # the part a converted format-1 store's rows go to


class StoreModelError(InputError):
    """Embeddings of one model were about to be mixed with those of another in one store."""


class StoreBusyError(InputError):
    """A store part is being written by another live run."""


# ----------------------------------------------------------------------------------------------
# Keys


def normalise_sequence(sequence: str) -> str:
    """Upper case, whitespace removed, trailing stop codons ('*') stripped."""
    return "".join(sequence.split()).upper().rstrip("*")


def sequence_key(sequence: str) -> str:
    """Store key of a sequence: sha256 hex of its normalised form."""
    return hashlib.sha256(normalise_sequence(sequence).encode()).hexdigest()


def key_hashes(keys: Sequence[str] | np.ndarray) -> np.ndarray:
    """sha256 hex keys (str or bytes) -> uint64 [n, 2]: their first 128 bits as (high, low) words."""
    text = "".join(k.decode() if isinstance(k, bytes) else k for k in (k[:32] for k in keys))
    return np.frombuffer(bytes.fromhex(text), ">u8").astype(np.uint64).reshape(-1, 2)


def sequence_hashes(sequences: Iterable[str]) -> np.ndarray:
    """Sequences -> uint64 [n, 2] key hashes (of their normalised forms; = key_hashes of their keys)."""
    raw = b"".join(hashlib.sha256(normalise_sequence(s).encode()).digest()[:16] for s in sequences)
    return np.frombuffer(raw, ">u8").astype(np.uint64).reshape(-1, 2)


def share_of(hashes: np.ndarray, count: int) -> np.ndarray:
    """Which of `count` writers embeds each key: int64 [n], the high word modulo `count` (stable
    across runs, machines and process counts' orders)."""
    return (hashes[:, 0] % np.uint64(count)).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Reading one part


def _pread_rows(handle, rows: np.ndarray, out: np.ndarray) -> None:
    """Reads rows `rows` (int64 [n]) of a raw file of out.shape[1:]-shaped rows into `out` [n, ...]:
    first advises the kernel to read them all (POSIX_FADV_WILLNEED queues asynchronous reads, so
    a cold lookup waits for one round of parallel reads, not one read after another), then copies
    each. pread, not a mapping: a mapped page cache (large folios, fault-around) would enter the
    process's RSS and grow it towards the store's size over many lookups."""
    size, fd = out[0].nbytes if len(out) else 0, handle.fileno()
    if not size:
        return
    for row in rows:
        os.posix_fadvise(fd, int(row) * size, size, os.POSIX_FADV_WILLNEED)
    for i, row in enumerate(rows):
        if os.preadv(fd, [out[i]], int(row) * size) != size:
            raise InputError(f"{handle.name}: row {row} is past the end of the file")


class _IndexBlocks:
    """The index blocks one lookup reads, fetched with `_pread_rows` on first use and kept."""

    def __init__(self, part: "Part"):
        self.part, self.ids = part, np.empty(0, np.int64)
        self.data = np.empty((0, part.block_words), np.uint64)

    def entry(self, positions, field: int):
        """Field `field` of index entries `positions` (entry p: word 3 (p mod R) + field of block p // R)."""
        per_block = self.part.per_block
        block = np.asarray(positions) // per_block
        missing = np.setdiff1d(block, self.ids)
        if len(missing):
            new = np.empty((len(missing), self.part.block_words), np.uint64)
            _pread_rows(self.part._index, missing, new)
            ids, data = np.concatenate([self.ids, missing]), np.concatenate([self.data, new])
            order = np.argsort(ids)
            self.ids, self.data = ids[order], data[order]
        return self.data[np.searchsorted(self.ids, block), 3 * (np.asarray(positions) % per_block) + field]


def _find(entry, size: int, start: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Rows of `query` hashes [n, 2] in a table of `size` entries sorted by high word, read through
    `entry(positions, field)` (field 0 high word, 1 low word, 2 row), where `start[i]` is the first
    position with high word >= the query's -> int64 [n], -1 where absent. Equal high words with
    other low words (odds ~ n^2 / 2^65) are stepped over one by one."""
    out = np.full(len(query), -1, np.int64)
    if not size or not len(query):
        return out
    at = np.minimum(start, size - 1)
    same_high = (start < size) & (entry(at, 0) == query[:, 0])
    hit = same_high & (entry(at, 1) == query[:, 1])
    out[hit] = entry(at[hit], 2)
    for i in np.flatnonzero(same_high & ~hit):
        p = int(start[i]) + 1
        while p < size and entry(p, 0) == query[i, 0]:
            if entry(p, 1) == query[i, 1]:
                out[i] = entry(p, 2)
                break
            p += 1
    return out


def _sorted_table(hashes: np.ndarray, first_row: int) -> np.ndarray:
    """uint64 [n, 2] hashes of rows first_row.. -> uint64 [n, 3] (high, low, row) sorted by high word."""
    order = np.argsort(hashes[:, 0], kind="stable")
    return np.column_stack([hashes[order], first_row + order.astype(np.uint64)]).astype(np.uint64)


def _table_entry(table: np.ndarray):
    return lambda positions, field: table[positions, field]


class Part:
    """One writer's rows as a reader sees them (the state committed when it was opened)."""

    def __init__(self, path: pathlib.Path, dim: int):
        self.path, self.name, self.dim = path, path.name, dim
        for attempt in range(3):
            try:
                self._load()
                break
            except FileNotFoundError:  # its writer replaced the index file between our reads
                if attempt == 2:
                    raise

    def _load(self) -> None:
        info = json.loads((self.path / PART_INFO).read_text())
        self.model, self.rows, self.indexed = info["model"], int(info["rows"]), int(info["indexed"])
        self.index_name, self.block_words = info.get("index"), int(info.get("block_words", BLOCK_WORDS))
        self.per_block = self.block_words // 3
        if self.indexed:
            self._index = open(self.path / self.index_name, "rb", buffering=0)
            self._fences = np.fromfile(self.path / f"fences-{self.indexed:012d}.u64", np.uint64)
        else:
            self._index, self._fences = None, np.empty(0, np.uint64)
        tail = np.fromfile(self.path / KEYS_FILE, np.uint64, 2 * (self.rows - self.indexed),
                           offset=16 * self.indexed).reshape(-1, 2) if self.rows > self.indexed else None
        self._set_tail(tail)
        self._embeddings = open(self.path / EMBEDDINGS_FILE, "rb", buffering=0)

    def _set_tail(self, hashes: np.ndarray | None) -> None:
        """The unindexed rows [indexed, rows): uint64 [m, 3] (high, low, row), sorted in memory."""
        self._tail = _sorted_table(hashes if hashes is not None else np.empty((0, 2), np.uint64), self.indexed)

    def _words(self, positions, field: int):
        """Where index entry `positions` keeps `field`: entry p is word 3 (p mod R) + field of block p // R."""
        return positions // self.per_block * self.block_words + 3 * (positions % self.per_block) + field

    def _lower_bound(self, high: np.ndarray, entry) -> np.ndarray:
        """First index position whose high word is >= each of `high` -> int64 [n]. The in-memory
        fences (each block's first high word) pick the one block where it can lie; a binary search
        of all queries at once finds it there (8 steps). Its first step reads every query's block
        in one round (`_IndexBlocks`); the others find them read."""
        b = np.searchsorted(self._fences, high, side="left")  # blocks starting below the key
        left = np.maximum(b - 1, 0) * self.per_block
        right = np.minimum(b * self.per_block, self.indexed)
        while (active := left < right).any():
            middle = (left + right) // 2
            below = entry(np.minimum(middle, self.indexed - 1), 0) < high
            left = np.where(active & below, middle + 1, left)
            right = np.where(active & ~below, middle, right)
        return left

    def _positions(self, high: np.ndarray) -> np.ndarray:
        """`_lower_bound` in batches of LOOKUP_BATCH queries (its blocks: 4 KiB per query)."""
        return np.concatenate([np.empty(0, np.int64)] + [
            self._lower_bound(high[a:a + LOOKUP_BATCH], _IndexBlocks(self).entry)
            for a in range(0, len(high), LOOKUP_BATCH)])

    def lookup(self, query: np.ndarray) -> np.ndarray:
        """uint64 [n, 2] hashes -> int64 [n] rows of this part, -1 where absent."""
        found = np.full(len(query), -1, np.int64)
        for a in range(0, len(query) if self.indexed else 0, LOOKUP_BATCH):
            batch, blocks = query[a:a + LOOKUP_BATCH], _IndexBlocks(self)
            found[a:a + len(batch)] = _find(blocks.entry, self.indexed, self._lower_bound(batch[:, 0], blocks.entry),
                                            batch)
        if len(self._tail):
            tail = _find(_table_entry(self._tail), len(self._tail), np.searchsorted(self._tail[:, 0], query[:, 0]),
                         query)
            found = np.where(found >= 0, found, tail)
        return found

    def read(self, rows: np.ndarray) -> np.ndarray:
        """int64 [n] rows -> float16 [n, dim], reading only those rows (in ascending order)."""
        order = np.argsort(rows)
        out = np.empty((len(rows), self.dim), np.float16)
        ordered = np.empty_like(out)
        _pread_rows(self._embeddings, rows[order], ordered)
        out[order] = ordered
        return out

    def hashes(self) -> np.ndarray:
        """uint64 [rows, 2]: every row's key hash, in row order."""
        return np.fromfile(self.path / KEYS_FILE, np.uint64, 2 * self.rows).reshape(-1, 2)


class Format1Part:
    """The chunk-*.npz files of a format-1 store, read in place (keys held in memory: format-1
    stores were written by one host and are small)."""

    def __init__(self, store: pathlib.Path, dim: int):
        self.path, self.name, self.dim = store, "format-1 chunks", dim
        self.chunks = sorted(store.glob("chunk-*.npz"))
        keys = [self._array(c, "keys") for c in self.chunks]
        self._offsets = np.cumsum([0] + [len(k) for k in keys])
        self.rows = int(self._offsets[-1])
        hashes = key_hashes(np.concatenate(keys)) if self.rows else np.empty((0, 2), np.uint64)
        self._hashes, self._table = hashes, _sorted_table(hashes, 0)

    @staticmethod
    def _array(chunk: pathlib.Path, name: str) -> np.ndarray:
        with np.load(chunk, allow_pickle=False) as data:
            return data[name]

    def lookup(self, query: np.ndarray) -> np.ndarray:
        return _find(_table_entry(self._table), len(self._table), np.searchsorted(self._table[:, 0], query[:, 0]),
                     query)

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), np.float16)
        chunk_of = np.searchsorted(self._offsets, rows, side="right") - 1
        for c in np.unique(chunk_of):
            picked = chunk_of == c
            out[picked] = self._array(self.chunks[c], "embeddings")[rows[picked] - self._offsets[c]]
        return out

    def hashes(self) -> np.ndarray:
        return self._hashes


# ----------------------------------------------------------------------------------------------
# Writing one part


class PartWriter(Part):
    """The one live writer of a part: appends rows, and sees them at once in `lookup`.

    Holds an exclusive `fcntl.flock` on the part's writer.lock while open, so a second run writing
    the same part stops with StoreBusyError instead of interleaving rows. flock is a local lock: it
    protects runs on one machine and on file systems that forward it (Linux NFSv4, Lustre mounted
    with -o flock), not two hosts on an NFSv3 or SMB mount that ignores it; there, give each host its
    own part (`--writer`, or `--distributed`, which names parts by process index)."""

    def __init__(self, store: pathlib.Path, name: str, model: dict):
        path = store / PARTS / name
        path.mkdir(parents=True, exist_ok=True)
        self._lock = open(path / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise StoreBusyError(f"{path} is being written by another live run ({holder}); wait for it to end, "
                                 "or give this run its own part (--writer NAME)") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._lock.flush()
        try:
            if not (path / PART_INFO).is_file():
                for name_ in (KEYS_FILE, EMBEDDINGS_FILE):
                    (path / name_).touch()
                files.write_text_atomic(path / PART_INFO, json.dumps(
                    {"format": FORMAT, "rows": 0, "indexed": 0, "index": None, "block_words": BLOCK_WORDS,
                     "dim": model["dim"], "model": model}))
            super().__init__(path, int(model["dim"]))
            check_same_model(self.model, model, f"{path}")
        except BaseException:
            self._lock.close()
            raise
        # A killed writer may have appended bytes it never counted in part.json: drop them.
        os.truncate(path / KEYS_FILE, 16 * self.rows)
        os.truncate(path / EMBEDDINGS_FILE, 2 * self.dim * self.rows)
        for stale in path.glob(".*.tmp*"):
            stale.unlink()
        self.rows_at_open = self.rows
        self._tail_keys, self._sorted_tail = [self._tail_hashes()], True

    def _tail_hashes(self) -> np.ndarray:
        """The tail's hashes in row order -> uint64 [m, 2]."""
        in_row_order = np.empty((len(self._tail), 2), np.uint64)
        in_row_order[self._tail[:, 2].astype(np.int64) - self.indexed] = self._tail[:, :2]
        return in_row_order

    def append(self, hashes: np.ndarray, embeddings: np.ndarray) -> None:
        """Appends rows: uint64 [n, 2] hashes and float16 [n, dim] embeddings, durable on return."""
        if embeddings.shape != (len(hashes), self.dim):
            raise ValueError(f"embeddings {embeddings.shape} != ({len(hashes)}, {self.dim})")
        for name, data in ((EMBEDDINGS_FILE, np.ascontiguousarray(embeddings, np.float16)),
                           (KEYS_FILE, np.ascontiguousarray(hashes, np.uint64))):
            with open(self.path / name, "ab") as handle:
                handle.write(data.tobytes())
                handle.flush()
                os.fsync(handle.fileno())
        self.rows += len(hashes)
        self._write_info()
        self._tail_keys.append(np.asarray(hashes, np.uint64))
        if self.rows - self.indexed >= TAIL_ROWS:
            self.fold()
        else:
            self._sorted_tail = False

    def lookup(self, query: np.ndarray) -> np.ndarray:
        if not self._sorted_tail:
            self._set_tail(np.concatenate(self._tail_keys))
            self._tail_keys, self._sorted_tail = [self._tail_hashes()], True
        return super().lookup(query)

    def _write_info(self) -> None:
        files.write_text_atomic(self.path / PART_INFO, json.dumps(
            {"format": FORMAT, "rows": self.rows, "indexed": self.indexed, "index": self.index_name,
             "block_words": self.block_words, "dim": self.dim, "model": self.model}))

    def fold(self) -> None:
        """Merges the unindexed rows into a new sorted index file (memory: the tail plus blocks of
        the old index), then points part.json at it and deletes the old one."""
        if self.rows == self.indexed:
            return
        tail = _sorted_table(np.concatenate(self._tail_keys), self.indexed)
        total = self.rows
        # Tail entry j goes before old entry at[j]; old entry i moves up by the tail entries before it.
        at = self._positions(tail[:, 0]) if self.indexed else np.zeros(len(tail), np.int64)
        name = f"index-{total:012d}.u64"
        blocks = -(-total // self.per_block)
        with files.atomic_path(self.path / name) as tmp:
            merged = np.memmap(tmp, np.uint64, "w+", shape=(blocks * self.block_words,))
            step = TAIL_ROWS // self.per_block * self.per_block
            for a in range(0, self.indexed, step):  # the old index, whole blocks at a time
                i = np.arange(a, min(a + step, self.indexed))
                old = np.fromfile(self.path / self.index_name, np.uint64, offset=8 * self.block_words * (a // self.per_block),
                                  count=self.block_words * -(-len(i) // self.per_block))
                words = self._words(i + np.searchsorted(at, i, side="right"), 0)
                for field in range(3):
                    merged[words + field] = old[self._words(i - a, field)]
            words = self._words(at + np.arange(len(at)), 0)
            for field in range(3):
                merged[words + field] = tail[:, field]
            merged.flush()
            fences = np.array(merged[::self.block_words])
            del merged
        files.write_bytes_atomic(self.path / f"fences-{total:012d}.u64", fences.tobytes())
        previous = (self.index_name, self.indexed)
        self.indexed, self.index_name = total, name
        self._write_info()
        if previous[0]:
            (self.path / previous[0]).unlink(missing_ok=True)
            (self.path / f"fences-{previous[1]:012d}.u64").unlink(missing_ok=True)
        self._load()
        self._tail_keys, self._sorted_tail = [], True

    def close(self) -> None:
        """Folds the tail into the index and releases the part."""
        if self._lock.closed:
            return
        try:
            self.fold()
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


def check_same_model(have: dict, want: dict, where: str) -> None:
    """StoreModelError naming `where` when two model identities differ in a field that matters."""
    differ = {k: (have.get(k), want.get(k)) for k in IDENTITY_FIELDS if have.get(k) != want.get(k)}
    if differ:
        details = "; ".join(f"{k}: store has {a!r}, this run {b!r}" for k, (a, b) in differ.items())
        raise StoreModelError(f"{where} holds embeddings of another model ({have.get('source')}): {details}. "
                              "Use another store directory.")
