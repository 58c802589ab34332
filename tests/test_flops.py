"""The analytic cost model against XLA's cost analysis and the model itself; the README table."""
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from glm_jax.train import flops
from glm_jax.train import trainer as train
from glm_jax.model.glm import GLMConfig, count_parameters, create_model
from train_utils import REPO_ROOT, random_windows

SMALL = GLMConfig(emb_dim=65, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                  max_position_embeddings=64, num_pc=20, scan_layers=False)


def xla_flops(config: GLMConfig, batch_size: int = 8, genes: int = 30) -> float:
    """FLOPs XLA counts for the gradient of the training loss (layers unrolled: XLA's cost
    analysis counts a while-loop body once, so a scanned stack would be undercounted)."""
    model = create_model(config)
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    batch = {k: jnp.asarray(v) for k, v in random_windows(batch_size, config.emb_dim, config.num_pc, genes=genes).items()}
    masked = jnp.zeros((batch_size, genes), bool).at[:, :5].set(True)
    grad = jax.grad(lambda p: train.loss_fn(p, graphdef, batch, masked, None, train.ObjectiveConfig())[0])
    cost = jax.jit(grad).lower(params).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("position", ["relative_key_query", "relative_key", "none"])
def test_train_flops_match_xla_cost_analysis(position):
    """XLA also counts elementwise work (softmax, LayerNorm, GELU, the loss): about 4% here."""
    config = SMALL.replace(position_embedding_type=position)
    ratio = xla_flops(config) / flops.train_flops_per_step(config, 8, 30)
    assert 1.0 <= ratio <= 1.06


def test_per_layer_flops_match_xla():
    """One more layer costs what the formula says, within the elementwise share."""
    extra_xla = xla_flops(SMALL.replace(num_layers=3)) - xla_flops(SMALL)
    extra_analytic = (flops.train_flops_per_step(SMALL.replace(num_layers=3), 8, 30)
                      - flops.train_flops_per_step(SMALL, 8, 30))
    assert extra_xla / extra_analytic == pytest.approx(1.0, abs=0.06)


@pytest.mark.parametrize("config", [SMALL, GLMConfig(), GLMConfig(hidden_size=2048, num_heads=16, num_layers=20,
                                                                   intermediate_size=8192, max_position_embeddings=128)])
def test_parameter_count_matches_the_model(config):
    abstract = nnx.eval_shape(lambda: create_model(config))
    assert flops.parameter_count(config) == count_parameters(abstract)


def test_mfu_and_peaks():
    assert flops.mfu(989e12, 2.0, 1, 989e12) == pytest.approx(0.5)
    assert flops.peak_flops_per_device() is None  # CPU: unknown, MFU not reported


def test_readme_scaling_table_is_what_the_code_computes():
    if str(REPO_ROOT) not in sys.path:  # the benchmarks package lives beside glm_jax, not installed
        sys.path.insert(0, str(REPO_ROOT))
    from benchmarks import report

    readme = (REPO_ROOT / "README.md").read_text()
    assert report.render_readme(readme, {"scaling": report.scaling_block()}) == readme, \
        "README scaling table is stale: python benchmarks/run.py report"
