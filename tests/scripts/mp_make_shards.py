"""One process of a make-shards run with hash 'embeddings' (helpers.HashEmbeddings, no model);
the processes come from GLM_JAX_* (`glm-jax launch-local`), or one process without them.

    python tests/scripts/mp_make_shards.py OUT GENOME... [--die-at-get N]

Options as tests/test_make_shards_stream.py's MP_OPTIONS. --die-at-get N: process 1 kills itself
(SIGKILL) at its N-th embedding lookup (the first is the dimension check, the next ones write its
shards), i.e. a host lost while writing. Prints `embedded N` when this process embedded N > 0 proteins.
"""
import os
import signal
import sys

from glm_jax import distributed

if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("genomes", nargs="+")
    parser.add_argument("--die-at-get", type=int)
    args = parser.parse_args()
    several = distributed.ENV_NUM_PROCESSES in os.environ
    if several:
        distributed.initialize()

import jax  # noqa: E402

from glm_jax.data import make_shards  # noqa: E402
from glm_jax.data.windows import WindowConfig  # noqa: E402
from helpers import HashEmbeddings  # noqa: E402

OPTIONS = dict(eval_fraction=0.3, split_by="window", window=WindowConfig(20, 8, 10), num_components=6, seed=5,
               shuffle_buffer=3, num_partitions=8, progress=False)


class Dying(HashEmbeddings):
    def __init__(self, die_at: int | None):
        super().__init__()
        self.die_at, self.gets = die_at, 0

    def __call__(self, sequences):
        sequences = list(sequences)
        if sequences:
            print(f"embedded {len(sequences)}", flush=True)
        return super().__call__(sequences)

    def get(self, sequences):
        self.gets += 1
        if self.gets == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().get(sequences)


if __name__ == "__main__":
    processes = make_shards.Processes()
    if several:
        processes = make_shards.Processes(jax.process_index(), jax.process_count(), distributed.barrier)
    die_at = args.die_at_get if processes.index == 1 else None
    make_shards.make_shards(args.genomes, args.out, Dying(die_at), processes=processes,
                            log=lambda line: print(line, flush=True), **OPTIONS)
    sys.exit(0)
