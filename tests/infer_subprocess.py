"""`infer_genomes` in its own process, killed with SIGKILL in the middle of a chunk, for the resume test.

    python tests/infer_subprocess.py KILL_AT GENOME CHECKPOINT OUTPUT STORE ESM2_DIR

Chunks 0 .. KILL_AT-1 are written whole; of chunk KILL_AT only the pairs part is written, then the
process kills itself (no cleanup, no finally blocks: what an OOM killer or `kill -9` does).
"""
import os
import signal
import sys

from glm_jax.inference import genome, tables

if __name__ == "__main__":
    kill_at, genome_path, checkpoint, output, store, esm2_dir = sys.argv[1:]
    write_whole_chunk = tables.write_chunk

    def write_chunk_or_die(out_dir, chunk, result):
        if chunk == int(kill_at):
            tables.write_table(tables.part(out_dir, "pairs", chunk), result["pairs"])
            os.kill(os.getpid(), signal.SIGKILL)
        write_whole_chunk(out_dir, chunk, result)

    tables.write_chunk = write_chunk_or_die
    genome.infer_genomes([genome_path], checkpoint, output, store_dir=store, esm2_dir=esm2_dir, batch_size=8,
                         attention="pairs", chunk_windows=1, progress=False)
