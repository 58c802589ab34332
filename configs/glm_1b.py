"""gLM scaled to ~1B parameters on contigs of up to 60 genes, bf16 compute, FSDP.

    glm-jax train --config configs/glm_1b.py --workdir runs/glm_1b --config.data.train_pattern=...

Same architecture and objective as the defaults (configs/glm_base.py); see README "Training at scale" for its cost.
"""
from glm_jax.config import default_config


def get_config():
    config = default_config()
    config.model.hidden_size = 2048
    config.model.num_layers = 20
    config.model.num_heads = 16                # head_dim 128
    config.model.intermediate_size = 8192
    config.model.max_genes = 60                # longer contigs: make-shards --window 60
    config.model.max_position_embeddings = 128  # 255 distance rows: covers +-59 with room
    config.model.compute_dtype = "bfloat16"    # fp32 master weights, Adam state and loss
    config.model.remat_policy = "dots_no_batch"  # keep matmul outputs, recompute the rest
    config.train.batch_size = 1024
    config.optimizer.grad_clip_norm = 1.0      # cheap insurance at scale (the original never clipped)
    config.mesh.data = 1
    config.mesh.fsdp = -1                      # shard parameters and optimizer state over every device
    return config
