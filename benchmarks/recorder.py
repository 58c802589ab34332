"""One benchmark measurement = one JSON line; the recorder adds where and with what it was measured.

Record schema (`FIELDS`; absent values are null):
    case, config, impl, dtype, batch       what was run (impl: "jax", "torch_eager", "ShardReader", ...)
    shapes                                  dict of the other sizes (genes, emb_dim, length, ...)
    median_s, min_s, max_s, repeats, compile_s    `timing.time_fn`'s result (compile_s: the first
                                            call's extra time, jit / torch.compile)
    items_per_s, items_unit                 throughput, e.g. 12.5 "contigs/s"
    baseline, ratio_vs_baseline             what this was compared with in the same run on the same
                                            shapes (e.g. "torch_eager float32") and baseline time /
                                            this time (> 1: this is faster)
    model_flops, devices                    model FLOPs of one timed call and the devices it ran on
    mfu_measured_peak                       model FLOP/s / (devices x the same framework's matmul
                                            rate in the same dtype, measured in the same run)
    mfu_datasheet                           model FLOP/s / (devices x the bf16 dense data-sheet peak);
                                            filled here from model_flops, null on CPUs
    status, reason                          "ok", "failed" or "skipped" (+ why)
    extra                                   anything case-specific (genes_per_s, max_abs_diff, ...)
    platform, device, cpu_count, versions, commit, command, timestamp    filled by the recorder
    settings                                the environment variables that change speed (allocator
                                            tunables, XLA flags, thread counts) as they were set
"""
from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "results.jsonl"

SPEED_SETTINGS = ("GLIBC_TUNABLES", "XLA_FLAGS", "OMP_NUM_THREADS", "TF_ENABLE_ONEDNN_OPTS")
CASE_FIELDS = ("case", "config", "impl", "dtype", "batch", "shapes", "median_s", "min_s", "max_s", "repeats",
               "compile_s", "items_per_s", "items_unit", "baseline", "ratio_vs_baseline", "model_flops", "devices",
               "mfu_measured_peak", "mfu_datasheet", "status", "reason", "extra")
ENVIRONMENT_FIELDS = ("platform", "device", "cpu_count", "versions", "commit", "settings", "command", "timestamp")
FIELDS = CASE_FIELDS + ENVIRONMENT_FIELDS
STATUSES = ("ok", "failed", "skipped")
VERSIONED = ("jax", "jaxlib", "flax", "torch", "transformers", "tensorflow", "numpy")


def cpu_model() -> str:
    """The CPU's marketing name: lscpu's "Model name" (else /proc/cpuinfo, else the machine type)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        match = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        if match:
            return match.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", pathlib.Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict:
    """Installed versions (null when absent), read from package metadata without importing them."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    if versions["tensorflow"] is None:  # the CPU wheel's distribution name
        try:
            versions["tensorflow"] = importlib.metadata.version("tensorflow-cpu")
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> dict | None:
    """{"sha": HEAD, "dirty": uncommitted changes to tracked files outside benchmarks/results} of
    this checkout, or None (no git, or not a checkout)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout
    try:
        changes = git("status", "--porcelain", "-uno", "--", ".", ":!benchmarks/results")
        return {"sha": git("rev-parse", "HEAD").strip(), "dirty": bool(changes.strip())}
    except (OSError, subprocess.CalledProcessError):
        return None


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """Where records of this process are measured: platform, device name, versions, commit."""
    import jax

    backend = jax.default_backend()
    device = cpu_model() if backend == "cpu" else jax.devices()[0].device_kind
    return {"platform": backend, "device": device, "cpu_count": os.cpu_count(), "versions": package_versions(),
            "commit": git_commit(), "settings": {name: os.environ[name] for name in SPEED_SETTINGS if name in os.environ}}


def datasheet_peak(platform_name: str, device: str) -> float | None:
    """bf16 dense data-sheet peak FLOP/s of one accelerator device; None on CPUs and unknown kinds."""
    if platform_name == "cpu":
        return None
    from glm_jax.train.flops import PEAK_FLOPS_BF16

    return next((peak for name, peak in PEAK_FLOPS_BF16 if name in device), None)


class Recorder:
    """Appends one JSON line per `record(...)` to `path` (created with its folder if needed)."""

    def __init__(self, path: str | pathlib.Path = DEFAULT_RESULTS, command: list[str] | None = None, echo: bool = True):
        self.path = pathlib.Path(path)
        self.command = shlex.join(["python", "benchmarks/run.py", *(sys.argv[1:] if command is None else command)])
        self.echo = echo
        self.records: list[dict] = []

    def record(self, **fields) -> dict:
        unknown = sorted(set(fields) - set(CASE_FIELDS))
        if unknown:
            raise TypeError(f"unknown record fields {unknown}; allowed: {', '.join(CASE_FIELDS)}")
        for name in ("case", "config", "impl"):
            if not fields.get(name):
                raise TypeError(f"a record needs {name!r}")
        record = {name: fields.get(name) for name in CASE_FIELDS}
        record["status"] = record["status"] or "ok"
        if record["status"] not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {record['status']!r}")
        if record["status"] == "ok" and record["median_s"] is None:
            raise TypeError("an 'ok' record needs median_s")
        if record["status"] != "ok" and not record["reason"]:
            raise TypeError(f"a {record['status']!r} record needs a reason")
        record["shapes"] = record["shapes"] or {}
        record["extra"] = record["extra"] or {}
        record.update(environment(), command=self.command,
                      timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        peak = datasheet_peak(record["platform"], record["device"])
        if record["mfu_datasheet"] is None and peak and record["model_flops"] and record["median_s"]:
            record["mfu_datasheet"] = record["model_flops"] / record["median_s"] / ((record["devices"] or 1) * peak)
        self._append(record)
        self.records.append(record)
        if self.echo:
            print(summary(record), flush=True)
        return record

    def _append(self, record: dict) -> None:
        """One line in one write, fsynced: concurrent or killed runs never leave half a record."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, sort_keys=False, default=_jsonable) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _jsonable(value):
    """numpy scalars / arrays and tuples in records -> JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def summary(record: dict) -> str:
    """One human-readable line per record, printed as the run goes."""
    sizes = " ".join(f"{k}={v}" for k, v in record["shapes"].items() if isinstance(v, (int, float, str)))
    what = f"{record['case']} {record['config']} {record['impl']} {record['dtype'] or ''} batch={record['batch']}"
    what += f" {sizes}" if sizes else ""
    if record["status"] != "ok":
        return f"{what}: {record['status']} ({record['reason']})"
    text = f"{what}: {record['median_s'] * 1e3:.2f} ms"
    if record["items_per_s"]:
        text += f", {record['items_per_s']:,.1f} {record['items_unit']}"
    if record["ratio_vs_baseline"]:
        text += f", {record['ratio_vs_baseline']:.2f}x vs {record['baseline']}"
    if record["mfu_measured_peak"]:
        text += f", MFU {record['mfu_measured_peak']:.1%} of measured matmul peak"
    return text
