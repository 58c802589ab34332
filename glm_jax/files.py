"""Atomic file writes: the one way glm-jax writes a file that another run may read.

A file is written to a temporary name beside its destination, flushed and fsynced, then renamed
over the destination, and the folder is fsynced so the rename itself survives a crash. A write that
fails (or a process that is killed) leaves the previous file, or no file, and no temporary.
"""
from __future__ import annotations

import contextlib
import io
import os
import pathlib
import tempfile
from typing import Callable, Iterator

import numpy as np


def fsync_directory(directory: str | pathlib.Path) -> None:
    """Makes a rename inside `directory` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | pathlib.Path, suffix: str = "") -> Iterator[pathlib.Path]:
    """Yields a temporary path beside `path`; on success fsyncs it and renames it over `path`.

    For writers that want a file name rather than a file object (np.savez, torch.save, safetensors).
    `suffix` is kept at the end of the temporary name for writers that append their own extension.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write(path: str | pathlib.Path, write: Callable[[io.BufferedWriter], None]) -> pathlib.Path:
    """Calls `write(binary_file)` on a temporary file, then publishes it at `path` atomically."""
    path = pathlib.Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
    return path


def write_bytes_atomic(path: str | pathlib.Path, data: bytes) -> pathlib.Path:
    return atomic_write(path, lambda handle: handle.write(data))


def write_text_atomic(path: str | pathlib.Path, text: str) -> pathlib.Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def savez_atomic(path: str | pathlib.Path, **arrays: np.ndarray) -> pathlib.Path:
    """np.savez to `path` atomically (`path` is used exactly as given, no `.npz` appended)."""
    return atomic_write(path, lambda handle: np.savez(handle, **arrays))
