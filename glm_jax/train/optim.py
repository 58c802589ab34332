"""The optimiser from `config.optimizer`: AdamW, a warm-up schedule, optional clipping.

Defaults reproduce the original `train.py` (docs/ARCHITECTURE.md#optimisation): `transformers.AdamW`
(betas 0.9/0.999, eps 1e-6, no weight decay), lr 1e-4 after 5,000 linear warm-up steps, then
constant (`get_constant_schedule_with_warmup`). The original's `clip_grad_value_(1.0)` runs after
`optimizer.step()` and never changes an update, so clipping is off by default; when enabled here
it clips the gradients *before* the update, which is what clipping is meant to do.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from glm_jax.errors import ConfigError

SCHEDULES = ("warmup_constant", "warmup_cosine", "warmup_linear")


def learning_rate_schedule(opt_config: Any, num_steps: int) -> optax.Schedule:
    """lr(update index): linear warm-up from 0 over `warmup_steps`, then constant / cosine / linear
    decay to 0 at `num_steps`. The first update (index 0) uses lr 0, as HF's LambdaLR does."""
    peak, warmup, kind = opt_config.learning_rate, int(opt_config.warmup_steps), opt_config.schedule
    if kind not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule must be one of {SCHEDULES}, got {kind!r}")
    decay_steps = max(num_steps - warmup, 1)
    after = {
        "warmup_constant": lambda: optax.constant_schedule(peak),
        "warmup_cosine": lambda: optax.cosine_decay_schedule(peak, decay_steps),
        "warmup_linear": lambda: optax.linear_schedule(peak, 0.0, decay_steps),
    }[kind]()
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def scale_by_adam_eps_outside(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam as `transformers.AdamW` (<= 4.4x) computes it: eps is added to sqrt(v) *before*
    the bias correction,

        update = m / (1 - b1^t) * sqrt(1 - b2^t) / (sqrt(v) + eps)

    whereas optax / torch.optim add eps to sqrt(v / (1 - b2^t)). The two differ only while
    1 - b2^t is far from 1 (the first few thousand steps). State layout: `optax.ScaleByAdamState`.
    """

    def init(params):
        # two separate trees: shared buffers would be donated twice by a jitted step
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(jnp.zeros_like, params),
                                      nu=jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * jnp.square(g), updates, state.nu)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        step_size = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        updates = jax.tree.map(lambda m, v: step_size * m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def _decay_mask(params):
    """Weight decay (when enabled) applies to dense kernels only, not to biases, LayerNorm
    scales, or the token-type / distance embeddings (the usual BERT practice)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", "")).endswith("_kernel"), params)


def create_optimizer(opt_config: Any, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, lr schedule) from `config.optimizer`.

    Chain: [clip each element to +-grad_clip_value] -> [clip by global norm grad_clip_norm] ->
    Adam -> [decoupled weight decay] -> -lr(t). A clip threshold of 0 disables that clip.
    """
    schedule = learning_rate_schedule(opt_config, num_steps)
    parts = []
    if opt_config.grad_clip_value > 0:
        parts.append(optax.clip(opt_config.grad_clip_value))
    if opt_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
    if opt_config.eps_after_bias_correction:
        parts.append(optax.scale_by_adam(opt_config.b1, opt_config.b2, opt_config.eps))
    else:
        parts.append(scale_by_adam_eps_outside(opt_config.b1, opt_config.b2, opt_config.eps))
    if opt_config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(opt_config.weight_decay, mask=_decay_mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts), schedule
