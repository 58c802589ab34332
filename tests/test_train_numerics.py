"""The train step under each remat policy and in bfloat16, against the float32 step without remat.

Three steps of `trainer.train_step` on configs/tiny.py (dropout on, warm-up lr 0, 1e-5, 2e-5):
* remat recomputes the same operations with the same dropout masks, so losses and parameters
  equal the plain step's up to float32 summation order (rtol 1e-5, as the mesh tests);
* bf16 matmuls (float32 master weights, LayerNorm, softmax and loss) change each matmul by
  ~2^-9 relative: losses stay within 2% and gradient norms within 5% of float32, and parameters within the sum of the two steps' Adam updates (|update| <=
  lr x 1.5 in the first steps, whatever the gradient: a sign flip of a tiny gradient moves a
  parameter by at most twice that).
The bf16 dense layers themselves are checked against float64 numpy (forward and both gradients),
and the bf16 step's jaxpr against float32 dots in any dense layer.
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


def _bf16_rounded(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("spec", ["bse,ehd->bshd", "bshd,hde->bse", "bse,em->bsm"])
def test_bfloat16_dense_and_its_gradients_match_float64(spec):
    """_dense in bf16 (f32 accumulation, hand-written backward) against float64 numpy on the same
    bf16-rounded operands. A backward with a wrongly transposed einsum, a lost bias, or a
    cotangent not rounded like PyTorch autocast's is off by far more than bf16 rounding."""
    from glm_jax.model.glm import _dense

    sizes = dict(b=2, s=5, e=12, h=3, d=4, m=7)
    x_axes, kernel_axes = spec.split("->")[0].split(",")
    out_axes = spec.split("->")[1]
    rng = np.random.default_rng(0)
    x, kernel = (rng.standard_normal([sizes[a] for a in axes]).astype(np.float32) for axes in (x_axes, kernel_axes))
    bias = rng.standard_normal([sizes[a] for a in out_axes[-(len(kernel_axes) - len(set(kernel_axes) & set(x_axes))):]])
    cotangent = rng.standard_normal([sizes[a] for a in out_axes]).astype(np.float32)

    y, vjp = jax.vjp(lambda a, w, c: _dense(a, w, c, spec, jnp.bfloat16), x, kernel, bias.astype(np.float32))
    dx, dkernel, _ = vjp(jnp.asarray(cotangent, jnp.bfloat16))

    x64, kernel64, cot64 = _bf16_rounded(x), _bf16_rounded(kernel), _bf16_rounded(cotangent)
    expected_y = np.einsum(spec, x64, kernel64) + bias
    expected_dx = np.einsum(f"{out_axes},{kernel_axes}->{x_axes}", cot64, kernel64)
    expected_dkernel = np.einsum(f"{x_axes},{out_axes}->{kernel_axes}", x64, cot64)
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.float32 and dkernel.dtype == jnp.float32
    for got, want in ((y, expected_y), (dx, expected_dx), (dkernel, expected_dkernel)):
        # one bf16 rounding of the result (2^-8 relative) on values of size |want|.max()
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2 ** -7 * np.abs(want).max())


def _dots(jaxpr) -> list[tuple]:
    """(lhs aval, rhs aval, output aval) of every dot_general in `jaxpr` and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((eqn.invars[0].aval, eqn.invars[1].aval, eqn.outvars[0].aval))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dots(inner)
    return found


def bfloat16_loss():
    """(params, loss(params, dropout_rng)) of the tiny config (scan_layers=True) in bf16 on 4 windows."""
    config = repo_config("tiny")
    model_config = config_from_dict_like(config.model).replace(compute_dtype="bfloat16", scan_layers=True)
    params = nnx.to_pure_dict(nnx.state(create_model(model_config), nnx.Param))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: create_model(model_config)))
    batch = {k: jnp.asarray(v) for k, v in random_windows(4, model_config.emb_dim, model_config.num_pc).items()}
    masked = batch["attention_mask"].astype(bool)
    obj = trainer.ObjectiveConfig.from_config(config.objective)
    return params, lambda p, rng: trainer.loss_fn(p, graphdef, batch, masked, rng, obj)[0]


def test_bfloat16_train_step_runs_every_dense_matmul_in_bfloat16():
    """Forward and backward of every dense layer (a dot with a kernel-shaped operand or output)
    take bf16 operands: plain autodiff would hand the backward dots a float32 cotangent, and
    XLA:CPU runs those (and any bf16 -> bf16 dot) at the float32 rate."""
    params, loss = bfloat16_loss()
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(p, None)))(params)

    kernel_shapes = ({np.shape(v)[1:] for k, v in params["encoder"].items() if k.endswith("_kernel")}
                     | {np.shape(v) for k, v in params.items() if k.endswith("_kernel")})
    dense = [dot for dot in _dots(jaxpr.jaxpr) if {aval.shape for aval in dot} & kernel_shapes]
    assert len(dense) >= 3 * len(kernel_shapes), "forward + two backward dots per dense layer"
    assert all(lhs.dtype == rhs.dtype == jnp.bfloat16 for lhs, rhs, _ in dense), dense


def test_bfloat16_layers_on_cpu_update_no_stacked_buffers():
    """XLA:CPU turns every bf16 dynamic-update-slice inside a loop (a scan's stacked residuals and
    weight gradients) into a convert of the whole stacked buffer to f32 and back, once per layer:
    27% of gLM-base's bf16 step. So bf16 layers run unrolled on CPU even with scan_layers=True,
    and the compiled gradient has no dynamic-update-slice at all (the scan has dozens)."""
    params, loss = bfloat16_loss()
    grad = jax.jit(jax.grad(lambda p: loss(p, jax.random.key(0))))
    assert "dynamic-update-slice(" not in grad.lower(params).compile().as_text()
