"""make-shards' work directory: each process's spills and done markers, for resuming a lost run.

    OUT/.make-shards/host-00000-of-00002/   one folder per process (processes never share a file)
        run.json          what the run was started with; another run here starts the folder afresh
        windows.pkl       the planned windows this process writes (window_plan.WindowSpill)
        proteins/         its protein partitions (protein_set)
        plan.json  embed.json  shards.json    done markers, written atomically when a stage ends
    OUT/.make-shards/normalization.json       the normalisation was fitted and saved (process 0)

A rerun (same arguments, same number of processes) skips every stage whose marker exists and
redoes the others: a process killed while embedding restarts from its plan, and its store part
holds the proteins it had embedded; one killed while writing rewrites its own shards only.
Process 0 removes the whole folder once dataset_info.json is written.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil

from glm_jax import files

WORK_DIR = ".make-shards"


def host_dir_name(process_index: int, process_count: int) -> str:
    return f"host-{process_index:05d}-of-{process_count:05d}"


def describe_inputs(paths) -> list[dict]:
    """Name, size and modification time of input files: a changed file invalidates the work."""
    described = []
    for path in map(pathlib.Path, paths):
        stat = path.stat() if path.is_file() else None
        described.append({"path": str(path.absolute()), "bytes": stat.st_size if stat else None,
                          "mtime_ns": stat.st_mtime_ns if stat else None})
    return described


class Workspace:
    def __init__(self, out_dir: str | pathlib.Path, process_index: int, process_count: int, run: dict):
        self.root = pathlib.Path(out_dir) / WORK_DIR
        self.process_count = process_count
        self.dir = self.root / host_dir_name(process_index, process_count)
        self.run = json.loads(json.dumps(run))  # as it reads back from JSON
        run_file = self.dir / "run.json"
        if run_file.is_file() and json.loads(run_file.read_text()) != self.run:
            shutil.rmtree(self.dir)  # another run's work: none of it applies
        self.dir.mkdir(parents=True, exist_ok=True)
        if not run_file.is_file():
            files.write_text_atomic(run_file, json.dumps(self.run, indent=1))

    def host_dirs(self) -> list[pathlib.Path]:
        return [self.root / host_dir_name(p, self.process_count) for p in range(self.process_count)]

    def _marker(self, stage: str, shared: bool, directory: pathlib.Path | None = None) -> pathlib.Path:
        return (self.root if shared else directory or self.dir) / f"{stage}.json"

    def load(self, stage: str, *, shared: bool = False, directory: pathlib.Path | None = None) -> dict | None:
        """The marker of a finished stage (None: not finished). A shared marker also belongs to this run."""
        path = self._marker(stage, shared, directory)
        if not path.is_file():
            return None
        marker = json.loads(path.read_text())
        if shared and marker.get("run") != self.run:
            return None
        return marker

    def done(self, stage: str, value: dict, *, shared: bool = False) -> dict:
        files.write_text_atomic(self._marker(stage, shared), json.dumps({**value, "run": self.run} if shared else value))
        return value

    def forget(self, stage: str) -> None:
        self._marker(stage, False).unlink(missing_ok=True)

    def discard(self) -> None:
        """Removes this process's work (bad input: nothing of the run stays behind)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            os.rmdir(self.root)
        except OSError:
            pass

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
