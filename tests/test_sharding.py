"""Meshes from the config, parameters born sharded, the sufficiently-sharded check, microbatches."""
import jax
import numpy as np
import pytest
from flax import nnx

from glm_jax import sharding
from glm_jax.train import optim
from glm_jax.train import trainer as train
from glm_jax.model.glm import config_from_dict_like, create_model
from glm_jax.config import default_config


@pytest.mark.parametrize("sizes, devices, expected", [
    ({"data": -1, "fsdp": 1, "tensor": 1}, 8, (8, 1, 1)),
    ({"data": 2, "fsdp": -1, "tensor": 1}, 8, (2, 4, 1)),
    ({"data": 2, "fsdp": 2, "tensor": -1}, 8, (2, 2, 2)),
    ({"data": -1, "fsdp": 8, "tensor": 1}, 64, (8, 8, 1)),
])
def test_mesh_shape_fills_the_rest(sizes, devices, expected):
    assert sharding.resolve_mesh_shape(sizes, devices) == expected


@pytest.mark.parametrize("sizes, message", [
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one -1"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "cannot fill"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "needs 4 devices, 8 are available"),
])
def test_bad_mesh_shapes_are_refused(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.resolve_mesh_shape(sizes, 8)


def base_state_shardings(mesh, rules=sharding.LOGICAL_AXIS_RULES):
    config = default_config()
    model_config = config_from_dict_like(config.model)
    tx, _ = optim.create_optimizer(config.optimizer, 10)
    with sharding.use_mesh(mesh, rules):
        return model_config, tx, train.state_shardings(model_config, tx, mesh)


def test_base_model_is_born_sharded_over_fsdp():
    """gLM-base (279M params + Adam: 3.3 GB) initialised on an fsdp=8 mesh: each device holds
    its shard only, and the compiled init never needs a whole copy on any device."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    model_config, tx, shardings = base_state_shardings(mesh)
    compiled = jax.jit(train.state_initializer(model_config, tx, 0), out_shardings=shardings).lower().compile()
    state = compiled()
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    memory = compiled.memory_analysis()  # of the per-device program; a replicated init needs >= total
    assert memory.output_size_in_bytes + memory.temp_size_in_bytes < 0.25 * total
    kernel = state.params["encoder"]["mlp_in_kernel"]                # [19, 1280, 3072], embed -> fsdp
    assert kernel.shape == (19, 1280, 3072)
    assert {s.data.shape for s in kernel.addressable_shards} == {(19, 160, 3072)}
    assert len({s.device for s in kernel.addressable_shards}) == 8
    mu = state.opt_state[0].mu["encoder"]["query_kernel"]           # Adam moments like their params
    assert {s.data.shape for s in mu.addressable_shards} == {(19, 160, 10, 128)}
    fraction = sharding.unsharded_fraction(state.params, mesh, min_size=1 << 20)
    assert fraction < train.UNSHARDED_TOLERANCE  # the replicated distance tables, ~7%
    sharding.assert_params_sufficiently_sharded(state.params, mesh, train.UNSHARDED_TOLERANCE)
    per_device = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards
                     if s.device == jax.devices()[0])
    assert per_device < 0.2 * total


def test_a_wrong_rule_that_replicates_kernels_fails_loudly():
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    broken = tuple((name, None if name == "embed" else target) for name, target in sharding.LOGICAL_AXIS_RULES)
    _, _, shardings = base_state_shardings(mesh, broken)
    model_config = config_from_dict_like(default_config().model)
    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: create_model(model_config)), nnx.Param))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings.params)
    with pytest.raises(AssertionError, match=r"87.5% .* largest unsharded: \[\(74711040, .*mlp_out_kernel"):
        sharding.assert_params_sufficiently_sharded(abstract, mesh, train.UNSHARDED_TOLERANCE)


def test_microbatches_stay_on_their_devices():
    """Interleaved split: microbatch i holds rows i, i+k, ...; each device keeps its own rows."""
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    x = jax.device_put(np.arange(32 * 3).reshape(32, 3), sharding.batch_sharding(mesh))
    with sharding.use_mesh(mesh):
        micro = jax.jit(lambda a: train.split_microbatches(a, 2))(x)
    np.testing.assert_array_equal(np.asarray(micro)[1, :, 0], np.arange(1, 32, 2) * 3)
    for shard in micro.addressable_shards:       # device d: rows 4d .. 4d+3 of x, split in two
        rows = shard.data[:, :, 0] // 3
        assert rows.min() // 4 == rows.max() // 4
