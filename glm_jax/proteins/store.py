"""The ESM2 embedding store (format 2): float16 rows on disk, found by key without loading the store.

Layout (docs/embedding-store.md explains the choices and the measurement behind them):

    STORE/manifest.json                 {"format": 2, "model": identity of the ESM2 run}
    STORE/parts/NAME/part.json          committed rows, indexed rows, index file, model identity
    STORE/parts/NAME/embeddings.f16     float16 [rows, dim], appended; readers pread the rows they need
    STORE/parts/NAME/keys.u64           uint64 [rows, 2]: each row's 128-bit key hash, appended
    STORE/parts/NAME/index-N.u64        uint64 [ceil(N / 170), 512]: the N indexed rows' (hash high, hash low,
                                        row) sorted by high word, 170 to a 4 KiB block
    STORE/parts/NAME/fences-N.u64       uint64 [ceil(N / 170)]: each block's first high word (kept in memory)
    STORE/parts/NAME/writer.lock        flock'ed by the one live writer of the part

Each writer (one per host or process) appends to its own part, so hosts write at once without
locks between them; readers see every part. A batch is appended to both files, fsynced, and then
counted in part.json (replaced atomically): a killed writer leaves at most an uncounted tail, which
the next writer of the part truncates. Rows not yet in the sorted index (the tail) are searched in
memory; a writer folds them into a new index file every `TAIL_ROWS` rows and when it closes.

A lookup reads one index block (the in-memory fences say which), then the embedding row; each of
the two rounds queues all its pages for reading at once. `get` of k keys reads about 2.6k pages
(one index page, one or two pages of a 2,560-byte row), whatever the store's size. Keys are the
first 128 bits of the sha256 of the normalised sequence: among 10^8 proteins the odds of any
collision are ~1.5e-23 (64 bits: 2.7e-4, and a collision silently returns another protein's
embedding).

Format 1 (manifest + chunk-*.npz) is read in place; a writer converts it to format 2 first
(`convert_store`, `glm-jax convert-store`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np

from glm_jax import files
from glm_jax.errors import InputError
# One part's files (keys, index, row reads, the writer) live in store_parts; the names other modules
# and tests use are re-exported here, the store's public face.
from glm_jax.proteins.store_parts import (  # noqa: F401
    DEFAULT_WRITER, EMBEDDINGS_FILE, FORMAT, FORMAT1_PART, IDENTITY_FIELDS, KEYS_FILE, LOCK_FILE, MANIFEST, PART_INFO,
    PARTS, Format1Part, Part, PartWriter, StoreBusyError, StoreModelError, check_same_model, key_hashes,
    normalise_sequence, sequence_hashes, sequence_key, share_of)

log = logging.getLogger(__name__)


class EmbeddingStore:
    """Append-only float16 embeddings on disk, keyed by `sequence_key`, bound to one model.

    `EmbeddingStore(path)` opens an existing store (format 1 or 2) for reading; `EmbeddingStore(path,
    model=identity)` also creates one, refuses (StoreModelError) a store of another model, and
    converts a format-1 store to format 2. Writing goes through one part per writer: `add` appends
    to the part of `writing(name)` while that is open, else opens the default part for one call."""

    MANIFEST = MANIFEST

    def __init__(self, path: str | pathlib.Path, model: dict | None = None):
        self.path = pathlib.Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            if model is None:
                raise FileNotFoundError(f"{self.path}: not an embedding store (no {MANIFEST}); "
                                        "create it with `glm-jax embed-proteins`")
            _create_manifest(self.path, model)
        self.format, self.model = _read_manifest(self.path)
        if model is not None:
            check_same_model(self.model, model, str(self.path))
            if self.format == 1:
                convert_store(self.path)
                self.format = FORMAT
            for leftover in self.path.glob("chunk-*.npz"):  # a conversion killed after its manifest switch
                leftover.unlink(missing_ok=True)
        self.last_run = None  # an EmbedStats, set by embed_proteins
        self._writer: PartWriter | None = None
        self.refresh()

    def refresh(self) -> None:
        """Sees the parts (and rows) other writers committed since the store was opened."""
        dim = self.embedding_dim
        if self.format == 1:
            self._parts = [Format1Part(self.path, dim)]
            return
        parts = []
        for info in sorted((self.path / PARTS).glob(f"*/{PART_INFO}")):
            if self._writer is not None and info.parent == self._writer.path:
                parts.append(self._writer)
                continue
            part = Part(info.parent, dim)
            check_same_model(part.model, self.model, str(part.path))
            parts.append(part)
        self._parts = parts

    @property
    def embedding_dim(self) -> int:
        return int(self.model["dim"])

    @property
    def parts(self) -> list[str]:
        return [part.name for part in self._parts]

    def __len__(self) -> int:
        """Stored rows (a protein that two writers embedded at the same time counts twice)."""
        return sum(part.rows for part in self._parts)

    def __contains__(self, sequence: str) -> bool:
        return bool(self.locate(sequence_hashes([sequence]))[0][0] >= 0)

    def locate(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint64 [n, 2] hashes -> (part number int64 [n], row int64 [n]); part -1 where absent.
        The first part (in name order) holding a key wins."""
        part_of = np.full(len(hashes), -1, np.int64)
        row_of = np.full(len(hashes), -1, np.int64)
        for p, part in enumerate(self._parts):
            todo = np.flatnonzero(part_of < 0)
            if not len(todo):
                break
            rows = part.lookup(hashes[todo])
            hit = rows >= 0
            part_of[todo[hit]], row_of[todo[hit]] = p, rows[hit]
        return part_of, row_of

    def missing(self, sequences: Iterable[str]) -> list[str]:
        """Normalised sequences not in the store, each once, in first-seen order."""
        distinct = list(dict.fromkeys(map(normalise_sequence, sequences)))
        if not distinct:
            return []
        part_of, _ = self.locate(sequence_hashes(distinct))
        return [s for s, p in zip(distinct, part_of) if p < 0]

    def get(self, sequences: Sequence[str]) -> np.ndarray:
        """Embeddings of `sequences` -> float16 [n, dim]; KeyError naming missing sequences."""
        part_of, row_of = self.locate(sequence_hashes(sequences) if len(sequences) else np.empty((0, 2), np.uint64))
        absent = [s for s, p in zip(sequences, part_of) if p < 0]
        if absent:
            shown = ", ".join(repr(s[:20] + ("..." if len(s) > 20 else "")) for s in absent[:5])
            raise KeyError(f"{len(absent)} sequence(s) not in {self.path}: {shown}")
        return self._read(part_of, row_of)

    def get_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """uint64 [n, 2] key hashes -> float16 [n, dim] (KeyError when one is absent)."""
        part_of, row_of = self.locate(hashes)
        if (part_of < 0).any():
            raise KeyError(f"{int((part_of < 0).sum())} key(s) not in {self.path}")
        return self._read(part_of, row_of)

    def _read(self, part_of: np.ndarray, row_of: np.ndarray) -> np.ndarray:
        out = np.empty((len(part_of), self.embedding_dim), np.float16)
        for p in np.unique(part_of):
            picked = np.flatnonzero(part_of == p)
            out[picked] = self._parts[p].read(row_of[picked])
        return out

    def hashes(self) -> np.ndarray:
        """uint64 [n, 2]: every stored key hash once, sorted (memory: 16 bytes per row)."""
        every = [part.hashes() for part in self._parts]
        return np.unique(np.concatenate(every) if every else np.empty((0, 2), np.uint64), axis=0)

    @contextlib.contextmanager
    def writing(self, name: str = DEFAULT_WRITER) -> Iterator[PartWriter]:
        """Holds part `name` for writing (StoreBusyError when another live run holds it); `add`
        appends to it; on exit its rows are indexed and the part released."""
        if self.format != FORMAT:
            raise InputError(f"{self.path}: a format-{self.format} store; open it with model=... to convert it")
        writer = PartWriter(self.path, name, self.model)
        self._writer = writer
        try:
            self.refresh()
            yield writer
        finally:
            self._writer = None
            writer.close()
            self.refresh()

    def add(self, sequences: Sequence[str], embeddings: np.ndarray) -> None:
        """Appends `embeddings` [n, dim] of `sequences` to this run's part (durable on return)."""
        if embeddings.shape != (len(sequences), self.embedding_dim):
            raise ValueError(f"embeddings {embeddings.shape} != ({len(sequences)}, {self.embedding_dim})")
        if self._writer is None:
            with self.writing():
                self.add(sequences, embeddings)
            return
        self._writer.append(sequence_hashes(sequences), embeddings.astype(np.float16))


def _create_manifest(path: pathlib.Path, model: dict) -> None:
    """Writes STORE/manifest.json unless another writer (another host) got there first: a complete
    file of this process's own is linked into place, which fails when the manifest exists, so two
    creators never overwrite each other or leave a partial file."""
    path.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=path)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps({"format": FORMAT, "model": dict(model)}, indent=1))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(staged, 0o644)
        try:
            os.link(staged, path / MANIFEST)
        except FileExistsError:
            pass
    finally:
        os.unlink(staged)
    files.fsync_directory(path)


def _read_manifest(path: pathlib.Path) -> tuple[int, dict]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return int(manifest.get("format", 1)), manifest["model"]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path / MANIFEST}: not an embedding store manifest ({error})") from None


def convert_store(path: str | pathlib.Path) -> int:
    """Converts a format-1 store (chunk-*.npz) in place to format 2 -> rows converted (0 when it is
    format 2 already). Its rows become part `format1`; the manifest is switched only once the part
    is complete, and the chunks are deleted after that, so a conversion killed at any point is
    simply run again."""
    path = pathlib.Path(path)
    with open(path / ".convert.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process (host) converting: wait for it, then see format 2
        return _convert_locked(path)


def _convert_locked(path: pathlib.Path) -> int:
    version, model = _read_manifest(path)
    if version == FORMAT:
        return 0
    legacy = Format1Part(path, int(model["dim"]))
    shutil.rmtree(path / PARTS, ignore_errors=True)  # a conversion killed before the manifest switch
    writer = PartWriter(path, FORMAT1_PART, model)
    try:
        for chunk in legacy.chunks:
            keys, embeddings = legacy._array(chunk, "keys"), legacy._array(chunk, "embeddings")
            hashes = key_hashes(keys)
            fresh = writer.lookup(hashes) < 0  # compaction of format 1 could leave a key in two chunks
            _, first = np.unique(hashes, axis=0, return_index=True)
            keep = np.zeros(len(keys), bool)
            keep[first] = True
            keep &= fresh
            if keep.any():
                writer.append(hashes[keep], embeddings[keep].astype(np.float16))
    finally:
        writer.close()
    files.write_text_atomic(path / MANIFEST, json.dumps({"format": FORMAT, "model": model}, indent=1))
    for chunk in legacy.chunks:
        chunk.unlink(missing_ok=True)
    log.info("converted %s to format 2 (%d rows)", path, writer.rows)
    return writer.rows
