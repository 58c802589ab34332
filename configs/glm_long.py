"""gLM-base width on whole contigs: windows of up to 4,096 genes, memory-light attention, remat.

    glm-jax make-shards GENOMES --out shards_long --window 4096 --min-genes 64 --pad-to-multiple 128
    glm-jax train --config configs/glm_long.py --workdir runs/glm_long --config.data.train_pattern=shards_long

Same layers and objective as the defaults (configs/glm_base.py). The original's 30-gene windows
become whole contigs (most bacterial contigs have fewer than 4,096 genes), so attention never materialises
[genes, genes]: blockwise (XLA) here, `--config.model.attention=pallas` for the Pallas kernel on a
GPU. Distances beyond +-511 share the table's end rows (clip_distances), so the parameters keep
the original's shape and a glm_base checkpoint loads. Its row in the README scaling table carries
XLA's compiled memory per device (python -m benchmarks.scaling_table --compile).
"""
from glm_jax.config import default_config


def get_config():
    config = default_config()
    config.model.max_genes = 4096              # make-shards --window 4096 (--pad-to-multiple 128)
    config.model.attention = "blockwise"       # O(genes x block) memory; "pallas" on a GPU
    config.model.clip_distances = True         # |i - j| > 511 -> the table's end rows (Shaw et al. 2018)
    config.model.compute_dtype = "bfloat16"    # fp32 master weights, Adam state, softmax and loss
    config.model.remat_policy = "full"         # keep only each layer's input; recompute the rest
    config.train.batch_size = 16               # contigs per step: ~65k gene positions (base: 30k)
    config.optimizer.grad_clip_norm = 1.0      # cheap insurance on long sequences
    return config
