"""Embedding store lookups at metagenome scale (issue 20): `get` of random keys from a large store.

    python -m benchmarks.store_lookup --rows 1000000 [--dim 1280] [--keys 1000] [--work-dir DIR]
    python -m benchmarks.store_lookup --compare --rows 1000000     # format 2 vs LMDB vs zarr 3 (tensorstore)

`measure_store_get` writes a format-2 store of `rows` x `dim` float16 rows straight through the
store's part writer (synthetic sequences "M" + the row number in residue letters, rows of a known
pattern; no ESM2), then, in a fresh Python process, evicts the store's files from the page cache
(posix_fadvise DONTNEED: only this store's pages, no root needed, nothing else on the machine
affected), opens the store and times `get` of `keys` random sequences cold, then the same call
again warm, checking every value. Peak RSS is that process's (`ru_maxrss`, Python and numpy
included); `rss_before_mib` is its baseline before the store is opened.

`--compare` runs the same cold/warm `get` on the two library layouts that were the alternatives:
LMDB (one key -> value record per protein) and a zarr 3 array written by tensorstore (one
[1, dim] inner chunk per row inside shards of 65,536 rows; keys -> rows through the same hash
index as format 2 would need). The numbers and the choice are in docs/embedding-store.md.
`--compare` needs `pip install lmdb` (tensorstore comes with orbax-checkpoint); glm-jax itself
needs neither.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from glm_jax.proteins import store as st  # noqa: E402

LETTERS = "ACDEFGHIKLMNPQRSTVWY"
BATCH = 32_768
SHARD = 65_536  # zarr 3 rows per shard file


def sequence(row: int) -> str:
    """The synthetic protein of row `row`: 'M' + the row number in base 20, in residue letters."""
    digits = []
    while True:
        row, digit = divmod(row, 20)
        digits.append(LETTERS[digit])
        if not row:
            return "M" + "".join(reversed(digits))


def pattern(rows: np.ndarray, dim: int) -> np.ndarray:
    """float16 [n, dim]: row r's embedding, (7 r + column) mod 2039 (exact in float16), gathered from
    a [2039, dim] table so that writing 10^7 rows costs little CPU."""
    table = _table(dim)
    return table[(rows.astype(np.int64) * 7) % 2039]


@functools.lru_cache(maxsize=2)
def _table(dim: int) -> np.ndarray:
    return ((np.arange(2039)[:, None] + np.arange(dim)) % 2039).astype(np.float16)


def build_store(path: pathlib.Path, rows: int, dim: int) -> float:
    """Writes a format-2 store of `rows` synthetic rows -> seconds."""
    start = time.perf_counter()
    store = st.EmbeddingStore(path, model={"fingerprint": "synthetic", "dim": dim, "source": "benchmarks"})
    with store.writing() as part:
        for first in range(0, rows, BATCH):
            numbers = np.arange(first, min(first + BATCH, rows))
            part.append(st.sequence_hashes([sequence(int(r)) for r in numbers]), pattern(numbers, dim))
    return time.perf_counter() - start


def evict(path: pathlib.Path) -> None:
    """Drops the page-cache pages of every file under `path` (they are clean: written and fsynced)."""
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss would carry the parent's peak across fork + exec)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _lookup_worker(kind: str, path: pathlib.Path, rows: int, dim: int, keys: int, seed: int) -> dict:
    """In a fresh process: cold open + get, then warm get of the same keys, values checked."""
    picked = np.random.default_rng(seed).choice(rows, keys, replace=False)
    queries = [sequence(int(r)) for r in picked]
    expected = pattern(picked, dim)
    evict(path)
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    get = OPENERS[kind](path, dim)
    opened = time.perf_counter()
    got = get(queries)
    cold = time.perf_counter()
    np.testing.assert_array_equal(got, expected)
    again = time.perf_counter()
    get(queries)
    warm = time.perf_counter() - again
    return {"open_s": opened - start, "get_cold_s": cold - opened, "get_warm_s": warm,
            "rss_before_mib": rss_before, "peak_rss_mib": peak_rss_mib()}


def _open_format2(path: pathlib.Path, dim: int):
    return st.EmbeddingStore(path).get


def _open_lmdb(path: pathlib.Path, dim: int):
    import lmdb
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False)

    def get(queries):
        keys = st.sequence_hashes(queries)
        with env.begin(buffers=True) as txn:
            return np.stack([np.frombuffer(txn.get(k.tobytes()), np.float16) for k in keys])
    return get


def _open_zarr(path: pathlib.Path, dim: int):
    import tensorstore as ts
    array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "rows.zarr")}},
                    open=True, read=True).result()
    index = st.EmbeddingStore(path / "index")  # keys -> rows: the format-2 index of the same rows

    def get(queries):
        _, rows = index.locate(st.sequence_hashes(queries))
        return array.oindex[rows].read().result()
    return get


OPENERS = {"format2": _open_format2, "lmdb": _open_lmdb, "zarr3": _open_zarr}


def _build_lmdb(path: pathlib.Path, rows: int, dim: int) -> float:
    import lmdb
    start = time.perf_counter()
    env = lmdb.open(str(path), map_size=4 * rows * dim * 2 + (1 << 30), writemap=False, sync=True)
    for first in range(0, rows, BATCH):
        numbers = np.arange(first, min(first + BATCH, rows))
        hashes, values = st.sequence_hashes([sequence(int(r)) for r in numbers]), pattern(numbers, dim)
        with env.begin(write=True) as txn:
            for key, value in zip(hashes, values):
                txn.put(key.tobytes(), value.tobytes())
    env.sync(True)
    env.close()
    return time.perf_counter() - start


def _build_zarr(path: pathlib.Path, rows: int, dim: int) -> float:
    import tensorstore as ts
    start = time.perf_counter()
    path.mkdir(parents=True)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "rows.zarr")},
            "metadata": {"shape": [rows, dim], "data_type": "float16",
                         "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [SHARD, dim]}},
                         "codecs": [{"name": "sharding_indexed", "configuration": {
                             "chunk_shape": [1, dim], "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                             "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]}}]}}
    array = ts.open(spec, create=True, delete_existing=True).result()
    index = st.EmbeddingStore(path / "index", model={"fingerprint": "synthetic", "dim": 0})
    with index.writing() as part:
        for first in range(0, rows, SHARD):  # whole shards: no read-modify-write
            numbers = np.arange(first, min(first + SHARD, rows))
            array[first:first + len(numbers)].write(pattern(numbers, dim)).result()
            part.append(st.sequence_hashes([sequence(int(r)) for r in numbers]), np.empty((len(numbers), 0), np.float16))
    return time.perf_counter() - start


BUILDERS = {"format2": build_store, "lmdb": _build_lmdb, "zarr3": _build_zarr}


def disk_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def measure_store_get(rows: int, dim: int = 1280, keys: int = 1000, work_dir: str | pathlib.Path | None = None,
                      kind: str = "format2", keep: bool = False, seed: int = 0) -> dict:
    """Build a `kind` store of `rows` x `dim` float16 rows under `work_dir` (default
    /work/tmp-bench or $TMPDIR), then time `get` of `keys` random keys in a fresh process -> dict:
    rows, dim, keys, kind, build_s, store_gb, open_s, get_cold_s, get_warm_s, rss_before_mib,
    peak_rss_mib, cache ("evicted with posix_fadvise"). The store is deleted unless `keep`."""
    work_dir = pathlib.Path(work_dir or os.environ.get("GLM_JAX_BENCH_DIR", "/work/tmp-bench"))
    path = work_dir / f"store-{kind}-{rows}x{dim}"
    if path.exists():
        shutil.rmtree(path)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        build_s = BUILDERS[kind](path, rows, dim)
        worker = subprocess.run([sys.executable, "-m", "benchmarks.store_lookup", "--worker", kind, str(path),
                                 "--rows", str(rows), "--dim", str(dim), "--keys", str(keys), "--seed", str(seed)],
                                cwd=REPO, capture_output=True, text=True, check=False)
        if worker.returncode:
            raise RuntimeError(f"lookup worker failed: {worker.stderr[-2000:]}")
        result = json.loads(worker.stdout.strip().splitlines()[-1])
        return {"rows": rows, "dim": dim, "keys": keys, "kind": kind, "build_s": build_s,
                "store_gb": disk_bytes(path) / 1e9, **result, "cache": "store files evicted with posix_fadvise"}
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--compare", action="store_true", help="also LMDB and zarr 3 (tensorstore)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, path = args.worker
        print(json.dumps(_lookup_worker(kind, pathlib.Path(path), args.rows, args.dim, args.keys, args.seed)))
        return
    from benchmarks.recorder import cpu_model
    for kind in ("format2", "lmdb", "zarr3") if args.compare else ("format2",):
        result = measure_store_get(args.rows, args.dim, args.keys, args.work_dir, kind, args.keep, args.seed)
        print(json.dumps({**result, "cpu": cpu_model()}), flush=True)


if __name__ == "__main__":
    main()
