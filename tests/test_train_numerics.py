"""The train step under each remat policy and in bfloat16, against the float32 step without remat.

Three steps of `trainer.train_step` on configs/tiny.py (dropout on, warm-up lr 0, 1e-5, 2e-5):
* remat recomputes the same operations with the same dropout masks, so losses and parameters
  equal the plain step's up to float32 summation order (rtol 1e-5, as the mesh tests);
* bf16 matmuls (float32 master weights, LayerNorm, softmax and loss) change each matmul by
  ~2^-9 relative: losses stay within 2% and gradient norms within 5% of float32, and parameters within the sum of the two steps' Adam updates (|update| <=
  lr x 1.5 in the first steps, whatever the gradient: a sign flip of a tiny gradient moves a
  parameter by at most twice that).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax.model.glm import config_from_dict_like, create_model
from glm_jax.train import optim
from glm_jax.train import trainer
from helpers import random_windows, repo_config

STEPS, BATCH = 3, 16


def train_steps(**model_changes):
    """(per-step metrics, final params) of STEPS steps of the tiny config with `model_changes`."""
    config = repo_config("tiny")
    model_config = config_from_dict_like(config.model).replace(**model_changes)
    tx, schedule = optim.create_optimizer(config.optimizer, STEPS)
    state = jax.jit(trainer.state_initializer(model_config, tx, seed=0))()
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: create_model(model_config)))
    step = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                                     obj=trainer.ObjectiveConfig.from_config(config.objective), accumulation_steps=1))
    windows = random_windows(BATCH * STEPS, model_config.emb_dim, model_config.num_pc, seed=7)
    rng = jax.random.key(0)
    history = []
    for i in range(STEPS):
        batch = {k: jnp.asarray(v[i * BATCH:(i + 1) * BATCH]) for k, v in windows.items()}
        state, metrics = step(state, batch, rng)
        history.append({k: float(metrics[k]) for k in ("loss", "grad_norm", "learning_rate")})
    return history, jax.tree.map(np.asarray, state.params)


@pytest.fixture(scope="module")
def float32_run():
    return train_steps()


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_equal_the_plain_step(float32_run, policy):
    history, params = train_steps(remat_policy=policy)
    expected_history, expected_params = float32_run
    for mine, theirs in zip(history, expected_history):
        np.testing.assert_allclose([mine["loss"], mine["grad_norm"]], [theirs["loss"], theirs["grad_norm"]], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, expected_params)


def test_bfloat16_steps_are_finite_and_close_to_float32(float32_run):
    history, params = train_steps(compute_dtype="bfloat16", remat_policy="dots")
    expected_history, expected_params = float32_run
    for mine, theirs in zip(history, expected_history):
        assert np.isfinite(mine["loss"]) and np.isfinite(mine["grad_norm"])
        np.testing.assert_allclose(mine["loss"], theirs["loss"], rtol=2e-2)
        np.testing.assert_allclose(mine["grad_norm"], theirs["grad_norm"], rtol=5e-2)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))  # master weights stay float32
    moved = 2 * 1.5 * sum(h["learning_rate"] for h in expected_history)
    differences = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, expected_params))
    assert 0 < max(differences) <= moved
