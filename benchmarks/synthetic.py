"""Model sizes and random contig windows shared by the benchmark cases."""
from __future__ import annotations

import numpy as np

from glm_jax.model.glm import GLMConfig

GENES = 30  # genes per window, as the original's 30-gene windows
MIN_GENES = 15  # windows hold 15-30 real genes, padded to 30
MODEL_CONFIGS = {
    "tiny": GLMConfig(emb_dim=65, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                      max_position_embeddings=64, num_pc=20, scan_layers=False),  # the quickstart's stack
    "base": GLMConfig(),  # gLM-base: 1281-d inputs, 1280 hidden, 19 layers, 10 heads, 100-d labels
}


def model_windows(config: GLMConfig, size: int, seed: int = 0) -> dict:
    """Random windows of MIN_GENES..GENES genes padded to GENES: inputs_embeds float32
    [size, GENES, emb_dim], labels float32 [size, GENES, num_pc], attention_mask int32 [size, GENES]."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(GENES)[None] < rng.integers(MIN_GENES, GENES + 1, size)[:, None]).astype(np.int32)
    return {"inputs_embeds": (rng.normal(size=(size, GENES, config.emb_dim)) * mask[..., None]).astype(np.float32),
            "labels": (rng.normal(size=(size, GENES, config.num_pc)) * mask[..., None]).astype(np.float32),
            "attention_mask": mask}


def shard_windows(size: int, emb_dim: int, num_pc: int, seed: int = 0) -> dict:
    """Windows with every field `shards.ShardWriter` stores, float16 features as make-shards writes
    them: 16-30 genes, string metadata of realistic length."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(MIN_GENES + 1, GENES + 1, size)
    mask = (np.arange(GENES)[None] < lengths[:, None]).astype(np.int64)
    return {
        "inputs_embeds": (rng.standard_normal((size, GENES, emb_dim), np.float32) * mask[..., None]).astype(np.float16),
        "labels": (rng.standard_normal((size, GENES, num_pc), np.float32) * mask[..., None]).astype(np.float16),
        "attention_mask": mask, "prot_ids": np.cumsum(mask).reshape(mask.shape) * mask,
        "protein_hash": rng.integers(-2 ** 62, 2 ** 62, (size, GENES)) * mask,
        "strand": rng.choice([-1, 1], (size, GENES)) * mask,
        "gene_ids": np.where(mask, "NP_414542.1", "").astype(object),
        "gene_labels": np.where(mask, '{"function":"tail"}', "").astype(object),
        "num_genes": lengths, "window_index": np.arange(size), "window_start": np.zeros(size, np.int64),
        "contig_id": np.array([f"NC_000913.3_{i}" for i in range(size)], object),
        "genome": np.array(["genome.gbff.gz"] * size, object),
    }

