"""The optimiser: the original's defaults, schedules, and clipping before the update."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from glm_jax.config import default_config
from glm_jax.train import optim


def base_optimizer_config():
    return default_config().optimizer


def test_defaults_are_the_originals():
    c = base_optimizer_config()
    assert (c.learning_rate, c.b1, c.b2, c.eps, c.weight_decay) == (1e-4, 0.9, 0.999, 1e-6, 0.0)
    assert (c.schedule, c.warmup_steps, c.grad_clip_norm, c.grad_clip_value) == ("warmup_constant", 5000, 0.0, 0.0)


def test_warmup_constant_schedule_like_get_constant_schedule_with_warmup():
    schedule = optim.learning_rate_schedule(base_optimizer_config(), num_steps=1_296_960)
    lr = [float(schedule(step)) for step in (0, 2500, 5000, 10000, 1_296_959)]
    np.testing.assert_allclose(lr, [0.0, 5e-5, 1e-4, 1e-4, 1e-4], rtol=1e-6)


@pytest.mark.parametrize("kind", ["warmup_cosine", "warmup_linear"])
def test_decaying_schedules_peak_after_warmup_and_end_at_zero(kind):
    c = base_optimizer_config()
    c.schedule, c.warmup_steps = kind, 10
    schedule = optim.learning_rate_schedule(c, num_steps=110)
    assert float(schedule(10)) == pytest.approx(1e-4)
    assert float(schedule(60)) == pytest.approx(5e-5, rel=1e-5)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-12)


def adam_updates(transformation, grads_sequence, params):
    state = transformation.init(params)
    out = []
    for grads in grads_sequence:
        updates, state = transformation.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


def test_adam_matches_transformers_adamw_formula():
    """transformers.AdamW (the original's, removed from transformers 4.5x): eps added to sqrt(v)
    before bias correction: p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)."""
    c = base_optimizer_config()
    c.warmup_steps = 0
    tx, _ = optim.create_optimizer(c, 100)
    rng = np.random.default_rng(0)
    grads = [{"w": rng.normal(size=5).astype(np.float32) * 1e-5} for _ in range(3)]
    params = {"w": np.ones(5, np.float32)}
    got = adam_updates(tx, grads, params)
    p, m, v = np.ones(5), np.zeros(5), np.zeros(5)
    for t, g in enumerate(grads, start=1):
        m = 0.9 * m + 0.1 * g["w"]
        v = 0.999 * v + 0.001 * g["w"] ** 2
        p = p - 1e-4 * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (np.sqrt(v) + 1e-6)
        np.testing.assert_allclose(got[t - 1]["w"], p, rtol=1e-6)


def test_eps_after_bias_correction_is_torch_adamw():
    c = base_optimizer_config()
    c.warmup_steps, c.weight_decay = 0, 0.01
    c.eps_after_bias_correction = True
    tx, _ = optim.create_optimizer(c, 100)
    rng = np.random.default_rng(1)
    grads = [{"w_kernel": rng.normal(size=(3, 4)).astype(np.float32) * 1e-5} for _ in range(3)]
    got = adam_updates(tx, grads, {"w_kernel": np.ones((3, 4), np.float32)})
    weight = torch.nn.Parameter(torch.ones(3, 4))
    torch_opt = torch.optim.AdamW([weight], lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    for g, ours in zip(grads, got):
        weight.grad = torch.from_numpy(g["w_kernel"])
        torch_opt.step()
        np.testing.assert_allclose(ours["w_kernel"], weight.detach().numpy(), rtol=1e-6)


def test_no_clipping_by_default_and_clipping_before_the_update_when_asked():
    c = base_optimizer_config()
    c.warmup_steps = 0
    huge = {"w": jnp.full(4, 1e3)}
    params = {"w": jnp.zeros(4)}
    default, _ = optim.create_optimizer(c, 10)
    c.grad_clip_norm = 1.0
    clipped, _ = optim.create_optimizer(c, 10)
    default_state, clipped_state = default.init(params), clipped.init(params)
    _, default_state = default.update(huge, default_state, params)
    _, clipped_state = clipped.update(huge, clipped_state, params)
    # Adam's first moment sees the gradient the update used: raw by default, clipped when asked
    np.testing.assert_allclose(default_state[-2].mu["w"], 0.1 * 1e3)
    np.testing.assert_allclose(clipped_state[-2].mu["w"], 0.1 * 0.5, rtol=1e-6)  # norm 2000 -> 1
    c.grad_clip_norm, c.grad_clip_value = 0.0, 1.0
    by_value, _ = optim.create_optimizer(c, 10)
    _, value_state = by_value.update(huge, by_value.init(params), params)
    np.testing.assert_allclose(value_state[-2].mu["w"], 0.1)


def test_weight_decay_skips_biases_and_norms():
    c = base_optimizer_config()
    c.warmup_steps, c.weight_decay = 0, 0.1
    tx, _ = optim.create_optimizer(c, 10)
    params = {"dense_kernel": jnp.ones(2), "dense_bias": jnp.ones(2)}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(updates["dense_kernel"][0]) == pytest.approx(-1e-5)
    assert float(updates["dense_bias"][0]) == 0.0
