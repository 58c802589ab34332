"""gLM scaled to ~3B parameters on contigs of up to 120 genes, bf16 compute, FSDP (+ tensor).

    glm-jax train --config configs/glm_3b.py --workdir runs/glm_3b --config.data.train_pattern=...

For a TPU pod slice or several GPU hosts; see README "Training at scale" for its cost.
"""
from glm_jax.config import default_config


def get_config():
    config = default_config()
    config.model.hidden_size = 2560
    config.model.num_layers = 36
    config.model.num_heads = 20                # head_dim 128
    config.model.intermediate_size = 10240
    config.model.max_genes = 120               # make-shards --window 120
    config.model.max_position_embeddings = 128  # 255 distance rows
    config.model.compute_dtype = "bfloat16"
    config.model.remat_policy = "full"         # activations of 36 layers x 120 genes do not fit otherwise
    config.train.batch_size = 2048
    config.optimizer.grad_clip_norm = 1.0
    config.mesh.data = -1
    config.mesh.fsdp = 8                       # one GPU host / 8 TPU chips per parameter shard group
    config.mesh.tensor = 1
    return config
