"""Training logs: JSON lines (the machine-readable record), TensorBoard, and a progress bar.

`WORKDIR/metrics.jsonl` holds one object per log event: {"step", "split", "time", metrics...}.
On resume from step k, records after k (written by the interrupted run past its last
checkpoint) are dropped, so the file always describes one consistent run; TensorBoard is told
the same through `purge_step`. Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Optional

import numpy as np

from glm_jax import files

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(workdir: str | pathlib.Path, split: Optional[str] = None) -> list[dict]:
    """Records of `WORKDIR/metrics.jsonl` (optionally one split: "train", "eval", ...)."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if split is None or r["split"] == split]


def _truncate_after(path: pathlib.Path, step: int) -> None:
    """Rewrites `path` without records past `step` (atomically)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    files.write_text_atomic(path, "".join(line + "\n" for line in kept))


def _jsonable(value):
    if isinstance(value, (np.ndarray, list, tuple)):
        return [_jsonable(v) for v in np.asarray(value).tolist()]
    value = float(value) if isinstance(value, (np.floating, np.integer, float)) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLogger:
    """Writes metrics of one run to JSON lines and TensorBoard, and drives a tqdm progress bar.

    start_step: the step the run resumes from (0 for a fresh run); total_steps: for the ETA.
    progress: show progress (glm_jax.progress: a bar on a terminal, else a line every 30 s); default on.
    """

    def __init__(self, workdir: str | pathlib.Path, start_step: int, total_steps: int, *,
                 is_primary: bool = True, tensorboard: bool = True, progress: Optional[bool] = None):
        self.is_primary = is_primary
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self._writer = self._bar = None
        if not is_primary:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, start_step)
        self._file = self.path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(str(pathlib.Path(workdir) / TENSORBOARD_DIR), purge_step=start_step + 1)
        if progress is None or progress:
            from glm_jax.progress import Progress
            self._bar = Progress(total=total_steps, initial=start_step, unit="step", desc="train")

    def write(self, step: int, split: str, metrics: dict) -> None:
        """Logs scalars (and lists, e.g. a histogram's counts) of `split` at `step`."""
        if not self.is_primary:
            return
        record = {"step": int(step), "split": split, "time": time.time(),
                  **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                if np.ndim(value) == 0:
                    self._writer.add_scalar(f"{split}/{key}", float(value), step)
                else:
                    self._add_histogram(f"{split}/{key}", np.asarray(value, np.float64), step)
            self._writer.flush()
        if self._bar is not None and split == "train":
            self._bar.set_postfix({k: f"{float(metrics[k]):.4g}" for k in ("loss", "genes_per_s") if k in metrics})

    def _add_histogram(self, tag: str, counts: np.ndarray, step: int) -> None:
        """Counts over equal bins of [0, 1] (the confidence histogram) as a TensorBoard histogram."""
        edges = np.linspace(0.0, 1.0, len(counts) + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        total = counts.sum()
        if total == 0:
            return
        self._writer.add_histogram_raw(tag, min=0.0, max=1.0, num=int(total), sum=float((counts * centres).sum()),
                                       sum_squares=float((counts * centres ** 2).sum()),
                                       bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(),
                                       global_step=step)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def message(self, text: str) -> None:
        """A line for the terminal that does not break the progress bar."""
        if not self.is_primary:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.is_primary:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self._bar is not None:
            self._bar.close()
