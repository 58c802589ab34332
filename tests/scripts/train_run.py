"""A tiny training run in its own process, for the kill and SIGTERM tests (`helpers.start_script`).

    python tests/scripts/train_run.py WORKDIR STEPS DELAY_S [CHECKPOINT_EVERY]

DELAY_S slows every batch read so the parent can interrupt the run mid-way.
"""
import sys
import time

from helpers import readers, tiny_config

from glm_jax.train import trainer as train


class SlowReader:
    """A reader that takes `delay` seconds per batch (same contract as glm_jax.data.shards readers)."""

    def __init__(self, reader, delay: float):
        self.reader, self.delay = reader, delay

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.delay)
        return next(self.reader)

    def state(self):
        return self.reader.state()

    def restore(self, state):
        self.reader.restore(state)


if __name__ == "__main__":
    workdir, steps, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    config = tiny_config(steps=steps, checkpoint_every=int(sys.argv[4]) if len(sys.argv) > 4 else 2)
    train_reader, _ = readers(config)
    result = train.train_and_evaluate(config, workdir, train_data=SlowReader(train_reader, delay))
    print(f"finished at step {result.step} preempted={result.preempted}", flush=True)
