"""A tiny gLM for tests and smoke runs: same architecture, small sizes."""
from glm_jax.config import default_config


def get_config():
    config = default_config()
    config.model.emb_dim = 33
    config.model.hidden_size = 32
    config.model.num_layers = 2
    config.model.num_heads = 4
    config.model.intermediate_size = 64
    config.model.max_position_embeddings = 64
    config.model.num_pc = 12
    config.optimizer.warmup_steps = 10
    config.train.batch_size = 16
    config.train.num_steps = 20
    config.train.log_every = 5
    config.train.eval_every = 10
    config.train.eval_batches = 2
    config.train.checkpoint_every = 10
    return config
