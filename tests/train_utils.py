"""Helpers of the training tests: the tiny config, random windows, and runs on a given mesh."""
from __future__ import annotations

import math
import pathlib

import jax
import numpy as np

from glm_jax.config import load_config
from glm_jax.data import shards
from glm_jax.train import trainer as train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

GENES = 30
NUM_WINDOWS = 96


def random_windows(n: int, emb_dim: int, num_pc: int, seed: int = 0, genes: int = GENES) -> dict:
    """n contig windows of 15-30 genes padded to `genes`: inputs [n, genes, emb_dim], labels
    [n, genes, num_pc] (zero at padding, as make-shards writes them), attention_mask [n, genes]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(genes // 2, genes + 1, n)
    mask = (np.arange(genes)[None] < lengths[:, None]).astype(np.int32)
    return {"inputs_embeds": (rng.normal(size=(n, genes, emb_dim)) * mask[..., None]).astype(np.float32),
            "labels": (2 * rng.normal(size=(n, genes, num_pc)) * mask[..., None]).astype(np.float32),
            "attention_mask": mask}


def tiny_config(steps: int = 6, mesh=(8, 1, 1), **train_overrides):
    """configs/tiny.py logging every step, no eval, checkpoints every 2 steps."""
    config = load_config(str(REPO_ROOT / "configs" / "tiny.py"))
    config.train.num_steps = steps
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def readers(config, seed: int = 0, with_eval: bool = False):
    """Train (and eval) readers over random windows fitting `config.model`."""
    m = config.model
    train_reader = shards.InMemoryWindows(random_windows(NUM_WINDOWS, m.emb_dim, m.num_pc, seed),
                                          config.train.batch_size, seed=config.train.seed)
    eval_reader = None
    if with_eval:
        eval_reader = shards.InMemoryWindows(random_windows(32, m.emb_dim, m.num_pc, seed + 1),
                                             config.train.batch_size, shuffle=False)
    return train_reader, eval_reader


def run(config, workdir, with_eval: bool = False) -> train.TrainResult:
    """Trains `config` on the first prod(mesh) devices with random windows."""
    devices = jax.devices()[:math.prod((config.mesh.data, config.mesh.fsdp, config.mesh.tensor))]
    train_reader, eval_reader = readers(config, with_eval=with_eval)
    return train.train_and_evaluate(config, workdir, train_data=train_reader, eval_data=eval_reader, devices=devices)


def params_numpy(result: train.TrainResult) -> dict:
    return jax.tree.map(np.asarray, jax.device_get(result.state.params))
