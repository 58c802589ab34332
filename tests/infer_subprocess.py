"""`infer_genomes` in its own process, killed with SIGKILL in the middle of a chunk, for the resume tests.

    python tests/infer_subprocess.py KILL_AT GENOME CHECKPOINT OUTPUT STORE ESM2_DIR
    python tests/infer_subprocess.py --distributed KILL_PROCESS KILL_AT GENOME CHECKPOINT OUTPUT STORE ESM2_DIR

Chunks before KILL_AT are written whole; of chunk KILL_AT only the pairs part is written, then the
process kills itself (no cleanup, no finally blocks: what an OOM killer or `kill -9` does). With
--distributed it is one of several processes (glm_jax.distributed from GLM_JAX_*; options as
DISTRIBUTED_OPTIONS) and only process KILL_PROCESS dies.
"""
import os
import signal
import sys

from glm_jax.inference import genome, tables

# what tests/test_infer_stream.py's distributed runs use (the same on the command line)
DISTRIBUTED_OPTIONS = dict(window=30, stride=15, batch_size=2, chunk_windows=4, attention="pairs", hypotheses=True,
                           progress=False)


def die_at(kill_at: int) -> None:
    write_whole_chunk = tables.write_chunk

    def write_chunk_or_die(out_dir, chunk, result):
        if chunk == kill_at:
            tables.write_table(tables.part(out_dir, "pairs", chunk), result["pairs"])
            os.kill(os.getpid(), signal.SIGKILL)
        write_whole_chunk(out_dir, chunk, result)

    tables.write_chunk = write_chunk_or_die


if __name__ == "__main__":
    if sys.argv[1] == "--distributed":
        from glm_jax import distributed
        distributed.initialize()
        import jax
        kill_process, kill_at, genome_path, checkpoint, output, store, esm2_dir = sys.argv[2:]
        if jax.process_index() == int(kill_process):
            die_at(int(kill_at))
        genome.infer_genomes([genome_path], checkpoint, output, store_dir=store, esm2_dir=esm2_dir,
                             **DISTRIBUTED_OPTIONS)
    else:
        kill_at, genome_path, checkpoint, output, store, esm2_dir = sys.argv[1:]
        die_at(int(kill_at))
        genome.infer_genomes([genome_path], checkpoint, output, store_dir=store, esm2_dir=esm2_dir, batch_size=8,
                             attention="pairs", chunk_windows=1, progress=False)
