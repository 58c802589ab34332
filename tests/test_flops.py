"""The analytic cost model against XLA's cost analysis and the model itself; the README table."""
import functools
import json
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from glm_jax.train import flops
from glm_jax.train import trainer as train
from glm_jax.model.glm import GLMConfig, count_parameters, create_model
from helpers import REPO_ROOT, random_windows

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


def _benchmarks():
    if str(REPO_ROOT) not in sys.path:  # the benchmarks package lives beside glm_jax, not installed
        sys.path.insert(0, str(REPO_ROOT))
    from benchmarks import report, scaling_table

    return report, scaling_table


def test_readme_scaling_table_is_what_the_code_computes():
    """The docs/performance.md block equals the table computed now, compiled memory read from its results file."""
    report, _ = _benchmarks()
    page = (REPO_ROOT / "docs" / "performance.md").read_text()
    assert report.render_readme(page, {"scaling": report.scaling_block()}) == page, \
        "docs/performance.md scaling table is stale: python benchmarks/run.py report"


@pytest.mark.slow
def test_compiled_memory_results_are_current():
    """Recompiles every data-parallel row (minutes at 4,096 genes): the stored numbers within 1%."""
    _, scaling_table = _benchmarks()
    stored = json.loads(scaling_table.COMPILED_FILE.read_text())
    for path, measured in scaling_table.compile_rows().items():
        assert stored[path]["key"] == measured["key"], f"{path}: python -m benchmarks.scaling_table --compile"
        assert stored[path]["total_bytes"] == pytest.approx(measured["total_bytes"], rel=0.01), path


def test_every_data_parallel_row_has_a_current_compiled_number():
    _, scaling_table = _benchmarks()
    table = scaling_table.markdown()
    assert "stale" not in table and "not compiled" not in table, "python -m benchmarks.scaling_table --compile"


def test_compiled_memory_is_what_a_data_parallel_device_holds():
    """The table's XLA column compiles one device with its share of the batch; the trainer's step,
    sharded over 4 (fake CPU) devices with the whole batch, must need the same per device (XLA's
    per-device memory analysis of the SPMD program): within 10%, the collectives' buffers."""
    from glm_jax import sharding
    from glm_jax.config import load_config
    from glm_jax.model.glm import config_from_dict_like
    from glm_jax.train import optim

    config = load_config(str(REPO_ROOT / "configs" / "tiny.py"))
    model_config = config_from_dict_like(config.model)
    devices, batch = 4, 16
    single = flops.compiled_train_memory_bytes(config, batch // devices)["total"]

    config.mesh.data = devices
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
    tx, schedule = optim.create_optimizer(config.optimizer, config.train.num_steps)
    with sharding.use_mesh(mesh):
        shardings = train.state_shardings(model_config, tx, mesh)
        state = train.abstract_state(model_config, tx, shardings)
        batch_sharding = sharding.batch_sharding(mesh)
        shapes = {"inputs_embeds": (batch, 30, model_config.emb_dim), "labels": (batch, 30, model_config.num_pc),
                  "attention_mask": (batch, 30)}
        dtypes = {"inputs_embeds": jnp.float32, "labels": jnp.float32, "attention_mask": jnp.int32}
        abstract_batch = {k: jax.ShapeDtypeStruct(shape, dtypes[k], sharding=batch_sharding)
                          for k, shape in shapes.items()}
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: create_model(model_config)))
        step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                                         obj=train.ObjectiveConfig.from_config(config.objective),
                                         accumulation_steps=1),
                       in_shardings=(shardings, batch_sharding, sharding.replicated(mesh)),
                       out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
        rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
        stats = step.lower(state, abstract_batch, rng).compile().memory_analysis()
    sharded = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)
    assert sharded == pytest.approx(single, rel=0.10)
