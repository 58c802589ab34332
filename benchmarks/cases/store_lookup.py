"""store_lookup: `EmbeddingStore.get` of random keys from a large format-2 store (time, peak RSS).

For each `--rows` size, `benchmarks/store_lookup.measure_store_get` writes a `rows` x `--dim`
float16 store through the store's part writer (synthetic rows, no ESM2), then in a fresh process
evicts the store's files from the page cache, opens the store and times `get` of `--keys` random
keys cold, then the same call warm, checking every value. One record per size: median_s is the
cold `get` (open excluded, in extra), peak RSS is that process's VmHWM. The store is deleted
afterwards; `--workdir` must hold rows x dim x 2 bytes (10^7 x 1280: 25.6 GB).
Targets (issue 20): cold get of 1,000 keys from 10^7 x 1280 under 1 s, RSS under 2 GB.
"""
from __future__ import annotations

import tempfile

from benchmarks import store_lookup

CASE = "store_lookup"
TARGET_SECONDS, TARGET_RSS_BYTES = 1.0, 2 * 10 ** 9


def add_arguments(parser) -> None:
    parser.add_argument("--rows", default="1000000,10000000", help="comma-separated store sizes (rows)")
    parser.add_argument("--dim", type=int, default=1280, help="embedding width (ESM2 650M: 1280)")
    parser.add_argument("--keys", type=int, default=1000, help="random keys per get")
    parser.add_argument("--workdir", default=None, help="where the stores are built (default /work/tmp-bench "
                                                        "or $GLM_JAX_BENCH_DIR); deleted afterwards")


def run(args, recorder) -> None:
    sizes = [2000] if args.quick else [int(r) for r in args.rows.split(",") if r.strip()]
    dim, keys = (16, 100) if args.quick else (args.dim, args.keys)
    with tempfile.TemporaryDirectory() as scratch:  # --quick without --workdir: a toy store in $TMPDIR
        workdir = args.workdir or (scratch if args.quick else None)
        for rows in sizes:
            record(recorder, store_lookup.measure_store_get(rows, dim=dim, keys=keys, work_dir=workdir))


def record(recorder, r: dict) -> None:
    """One record of `measure_store_get`'s result `r`: median_s is the cold get."""
    rows, dim, keys = r["rows"], r["dim"], r["keys"]
    rss = int(r["peak_rss_mib"] * 2 ** 20)
    cold = r["get_cold_s"]
    recorder.record(case=CASE, config=f"{dim}-d float16", impl="EmbeddingStore.get (format 2)",
                    dtype="float16", shapes={"rows": rows, "dim": dim, "keys": keys},
                    median_s=cold, min_s=min(cold, r["get_warm_s"]), max_s=cold, repeats=1,
                    items_per_s=keys / cold, items_unit="keys/s", status="ok",
                    extra={"get_cold_s": cold, "get_warm_s": r["get_warm_s"], "open_s": r["open_s"],
                           "peak_rss_bytes": rss, "rss_before_bytes": int(r["rss_before_mib"] * 2 ** 20),
                           "store_bytes": int(r["store_gb"] * 1e9), "build_s": r["build_s"],
                           "cache": r["cache"], "target_s": TARGET_SECONDS, "target_rss_bytes": TARGET_RSS_BYTES,
                           "meets_target": cold < TARGET_SECONDS and rss < TARGET_RSS_BYTES})
