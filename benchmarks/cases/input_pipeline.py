"""input_pipeline: shard writer and reader throughput vs what the gLM-base train step consumes.

Windows at gLM-base width (1281-d float16 inputs, 100-d labels, 30 genes, 16-30 real genes, every
field make-shards writes) go through `ShardWriter` (TFRecords), the TFRecord `ShardReader`
(tf.data, per-shard full shuffle, float32 out) and `InMemoryWindows` (numpy). Readers are timed
in steady state: one reader, `--windows` windows pulled per timed call from an endless stream.
Each reader's windows/s is compared with the windows/s of the fastest gLM-base `train_step`
record of this device in the results file (or, when there is none, a train step measured here):
ratio_vs_baseline = how many times faster the reader feeds than the step eats (target >= 5).
Without TensorFlow (the GPU image) the TFRecord parts are recorded as skipped.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import pathlib
import tempfile

from benchmarks import paired, synthetic
from benchmarks.recorder import environment
from benchmarks.timing import time_fn

CASE = "input_pipeline"
TARGET_RATIO = 5.0


def add_arguments(parser) -> None:
    parser.add_argument("--windows", type=int, default=2000, help="windows written, and read per timed call")
    parser.add_argument("--batch", type=int, default=32, help="windows per reader batch (the train batch)")
    parser.add_argument("--emb-dim", type=int, default=1281, help="input feature width (gLM-base: 1281)")
    parser.add_argument("--num-pc", type=int, default=100, help="label width (gLM-base: 100)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--train-config", default="base", help="whose train step the readers must feed")


def train_consumption(config_name: str, batch: int, args, results: pathlib.Path) -> tuple[float, str]:
    """-> (windows/s the train step consumes, what that number is): the fastest ok `train_step`
    record of `config_name` on this device in `results`, else one measured now at `batch`."""
    device = environment()["device"]
    best = None
    if results.is_file():
        for line in results.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (r.get("case") == "train_step" and r.get("config") == config_name and r.get("impl") == "jax"
                    and r.get("status") == "ok" and r.get("device") == device and r.get("items_per_s")
                    and (best is None or r["items_per_s"] > best["items_per_s"])):
                best = r
    if best is not None:
        return best["items_per_s"], (f"train_step {best['config']} jax {best['dtype']} batch={best['batch']} "
                                     f"({results.name}, {best['timestamp']})")
    from benchmarks.cases import train_step

    config = synthetic.MODEL_CONFIGS[config_name]
    _, params, _ = paired.paired_models(config)
    call, _ = train_step.jax_step(config, params, synthetic.model_windows(config, batch))
    seconds = time_fn(call, repeats=args.repeats, warmup=args.warmup)["median_s"]
    return batch / seconds, f"train_step {config_name} jax float32 batch={batch} (measured in this run)"


def pulling(reader, windows: int, batch: int):
    """A call that pulls `windows` windows (whole batches) from `reader` -> real genes read."""
    batches = max(1, windows // batch)

    def call():
        return int(sum(int(b["attention_mask"].sum()) for b in itertools.islice(reader, batches)))

    return call, batches * batch


def run(args, recorder) -> None:
    from glm_jax.data import shards

    windows = 64 if args.quick else args.windows
    batch = 8 if args.quick else args.batch
    data = synthetic.shard_windows(windows, args.emb_dim, args.num_pc)
    consumed, consumed_by = train_consumption("tiny" if args.quick else args.train_config, batch, args,
                                              pathlib.Path(args.output))
    common = dict(case=CASE, config=f"{args.emb_dim}-d inputs, {args.num_pc}-d labels", batch=batch,
                  baseline=consumed_by, items_unit="windows/s",
                  shapes={"genes": synthetic.GENES, "emb_dim": args.emb_dim, "num_pc": args.num_pc,
                          "windows": windows, "dtype_on_disk": "float16"})

    def record(impl: str, timing: dict, items: int, genes: int | None, extra: dict | None = None):
        rate = items / timing["median_s"]
        dtype = "float16" if impl == "ShardWriter" else "float32"  # written as stored, read as the model takes
        recorder.record(**common, impl=impl, dtype=dtype, **timing, items_per_s=rate,
                        ratio_vs_baseline=rate / consumed,
                        extra={"train_windows_per_s": consumed, "target_ratio": TARGET_RATIO,
                               "meets_target": rate / consumed >= TARGET_RATIO,
                               **({"genes_per_s": genes / timing["median_s"]} if genes is not None else {}),
                               **(extra or {})})

    memory = shards.InMemoryWindows(data, batch, seed=0, num_epochs=None)
    call, items = pulling(memory, windows, batch)
    record("InMemoryWindows", time_fn(call, repeats=args.repeats, warmup=args.warmup), items, call())

    if importlib.util.find_spec("tensorflow") is None:
        for impl in ("ShardWriter", "ShardReader"):
            recorder.record(**{**common, "baseline": None}, impl=impl, dtype="float32", status="skipped",
                            reason="tensorflow is not installed (TFRecord shards need it)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        writes = itertools.count()

        def write():
            out = pathlib.Path(tmp) / f"write-{next(writes)}"
            with shards.ShardWriter(out, "train", args.shards) as writer:
                for start in range(0, windows, 512):
                    writer.write({k: v[start:start + 512] for k, v in data.items()})
            return out, writer.close()

        timing = time_fn(write, repeats=1, warmup=1)
        directory, stats = write()
        size = sum(s["num_bytes"] for s in stats)
        shards.write_dataset_info(directory, {
            "emb_dim": args.emb_dim, "num_pc": args.num_pc, "max_genes": synthetic.GENES, "dtype": "float16",
            "splits": {"train": {"num_windows": windows, "shards": stats}}})
        record("ShardWriter", timing, windows, None, {"MB_per_s": size / timing["median_s"] / 1e6,
                                                      "bytes_per_window": size / windows})
        reader = shards.ShardReader(directory, batch, seed=0, num_epochs=None)
        call, items = pulling(reader, windows, batch)
        timing = time_fn(call, repeats=args.repeats, warmup=args.warmup)
        record("ShardReader", timing, items, call(), {"MB_per_s": items * size / windows / timing["median_s"] / 1e6,
                                                      "shuffle": "whole shard", "page_cached": True})
