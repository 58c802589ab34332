"""One process of a multi-process tiny training run (started by tests/multiprocess.py), or its
single-process reference.

    python tests/scripts/mp_train.py NPZ WORKDIR[,WORKDIR2...] [--steps N] [--reduction R[,R2...]]
        [--accumulation K] [--delay S] [--checkpoint-every C] [--log-every L]

Trains configs/tiny.py (dropout off) on mesh (4, 2, 1) (data x fsdp: parameters sharded across processes) with
global batch 16 read from NPZ by `trainer.open_reader`, one run per WORKDIR (with the matching
reduction), in the same processes. Each process writes WORKDIR/windows-p{I}.json (the window
indices of every batch it read); process 0 writes WORKDIR/params.npz (final parameters, names
flattened with "/"). Prints `step S` each time it reads a batch.
"""
import json
import pathlib
import time

from glm_jax import distributed

if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("npz")
    parser.add_argument("workdirs")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--reduction", default="all_positions")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=1)
    args = parser.parse_args()
    distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from helpers import tiny_config  # noqa: E402

from glm_jax.train import trainer  # noqa: E402


class RecordingReader:
    """Passes a reader through, noting the window indices of every batch it yields; `delay`
    seconds per batch lets a test signal the run mid-way."""

    def __init__(self, reader, delay: float):
        self.reader, self.delay, self.windows = reader, delay, []

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.delay)
        batch = next(self.reader)
        self.windows.append(np.asarray(batch["window_index"]).tolist())
        print(f"step {len(self.windows) - 1}", flush=True)
        return batch

    def state(self):
        return self.reader.state()

    def restore(self, state):
        self.reader.restore(state)


def config_for(npz: str, steps: int, reduction: str = "all_positions", accumulation: int = 1,
               checkpoint_every: int = 2, log_every: int = 1):
    config = tiny_config(steps=steps, mesh=(4, 2, 1), checkpoint_every=checkpoint_every,
                         accumulation_steps=accumulation, log_every=log_every)
    config.objective.reduction = reduction
    config.data.train_pattern = npz
    # dropout off: it draws other random numbers for other microbatch shapes, so accumulation
    # equals one large batch only without it (tests/test_train.py does the same)
    config.model.hidden_dropout = config.model.attention_dropout = 0.0
    return config


def train_one(npz: str, workdir: str, reduction: str, *, steps: int, accumulation: int, checkpoint_every: int,
              delay: float = 0.0, log_every: int = 1):
    """One run (see the module docstring) on every device of every process; its TrainResult."""
    config = config_for(npz, steps, reduction, accumulation, checkpoint_every, log_every)
    t = config.train
    reader = RecordingReader(trainer.open_reader(npz, "train", t.batch_size // jax.process_count(), t.seed, True),
                             delay)
    result = trainer.train_and_evaluate(config, workdir, train_data=reader, progress=False)
    out = pathlib.Path(workdir)
    (out / f"windows-p{jax.process_index()}.json").write_text(json.dumps(reader.windows))
    params = multihost_utils.process_allgather(result.state.params, tiled=True)  # sharded across processes
    if distributed.is_primary():
        flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
        np.savez(out / "params.npz", **flat)
    print(f"finished {workdir} at step {result.step} preempted={result.preempted}", flush=True)
    return result


if __name__ == "__main__":
    for workdir, reduction in zip(args.workdirs.split(","), args.reduction.split(",")):
        train_one(args.npz, workdir, reduction, steps=args.steps, accumulation=args.accumulation,
                  checkpoint_every=args.checkpoint_every, delay=args.delay, log_every=args.log_every)
