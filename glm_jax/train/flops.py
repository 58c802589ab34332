"""Analytic cost model of a gLM training step: model FLOPs, MFU and a memory estimate.

FLOPs count matrix multiplications only (2 * m * n * k each), the standard MFU convention
(PaLM appendix B, MaxText `calculate_tflops_training_per_device`): a training step costs three
forward passes (backward = 2x forward), independently of rematerialisation. Per contig of S
genes, with E = hidden, M = intermediate, F = emb_dim, L = layers, P hypotheses, C label size:

    embedding    2 S F E
    per layer    2 S (4 E^2 + 2 E M)           q, k, v, output projections and the MLP
               + 2 S^2 E (2 + R)               q.k and probs @ v, plus R relative-position terms
                                               (R = 2 relative_key_query, 1 relative_key, 0 none)
    head         2 S E P (C + 1)

`tests/test_flops.py` checks this count against XLA's cost analysis of the compiled step.
"""
from __future__ import annotations

from typing import Optional

import jax

from glm_jax.model.glm import GLMConfig

RELATIVE_TERMS = {"relative_key_query": 2, "relative_key": 1, "none": 0}

# Dense bf16 peak FLOP/s per device from the vendors' data sheets, by `device_kind` substring
# (first match wins, so the more specific names come first).
PEAK_FLOPS_BF16 = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),   # v5p reports "TPU v5"
    ("TPU v4", 275e12),
)


def forward_flops_per_contig(config: GLMConfig, genes: int) -> int:
    """Matmul FLOPs of one forward pass over a contig padded to `genes` positions."""
    E, S = config.hidden_size, genes
    embedding = 2 * S * config.emb_dim * E
    projections = 2 * S * (4 * E * E + 2 * E * config.intermediate_size)
    attention = 2 * S * S * E * (2 + RELATIVE_TERMS[config.position_embedding_type])
    head = 2 * S * E * config.num_pred * (config.num_pc + 1)
    return embedding + config.num_layers * (projections + attention) + head


def train_flops_per_step(config: GLMConfig, batch_size: int, genes: int) -> int:
    """Model FLOPs of one optimizer step over `batch_size` contigs (forward + backward)."""
    return 3 * batch_size * forward_flops_per_contig(config, genes)


def peak_flops_per_device(device: Optional[jax.Device] = None) -> Optional[float]:
    """Dense bf16 peak of `device` (default: the first), or None when unknown (e.g. CPUs)."""
    kind = (device or jax.devices()[0]).device_kind
    return next((peak for name, peak in PEAK_FLOPS_BF16 if name in kind), None)


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int, peak_per_device: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' combined peak."""
    return flops_per_step / seconds_per_step / (num_devices * peak_per_device)


def parameter_count(config: GLMConfig) -> int:
    """Parameters of `GLM(config)` (same count as `model.count_parameters`)."""
    E, M, L, P, C = (config.hidden_size, config.intermediate_size, config.num_layers, config.num_pred,
                     config.num_pc)
    per_layer = (4 * E * E + 4 * E        # q, k, v, output kernels and biases
                 + config.num_distances * config.head_dim
                 + 2 * E * M + M + E      # MLP kernels and biases
                 + 4 * E)                 # two LayerNorms
    embedding = config.emb_dim * E + E + config.type_vocab_size * E + 2 * E
    head = E * P * C + P * C + E * P + P
    return embedding + L * per_layer + head


def memory_per_device_bytes(config: GLMConfig, batch_per_device: int, genes: int,
                            weight_sharding: int = 1) -> dict[str, int]:
    """Rough training memory of one device, in bytes.

    state: float32 params + grads + Adam mu, nu (16 B/param), split over `weight_sharding`
    (fsdp x tensor) devices. activations: what the backward pass keeps per layer without
    rematerialisation (about 10 hidden-size and 3 intermediate-size vectors per gene in the
    compute dtype, plus float32 attention scores and probabilities [heads, S, S]), all layers.
    XLA's buffer reuse, fusion and remat change the activation term; treat it as an estimate.
    """
    bytes_per_act = 2 if config.compute_dtype == "bfloat16" else 4
    state = 16 * parameter_count(config) // weight_sharding
    per_gene = (10 * config.hidden_size + 3 * config.intermediate_size) * bytes_per_act
    per_contig_layer = genes * per_gene + 3 * config.num_heads * genes * genes * 4
    activations = config.num_layers * batch_per_device * per_contig_layer
    return {"state": state, "activations": activations, "total": state + activations}


def compiled_train_memory_bytes(config, batch_per_device: int) -> dict[str, int]:
    """XLA's memory analysis of one device's training step, compiled on abstract shapes (nothing
    is allocated) for the default backend: the whole train state (data parallel: parameters
    replicated) and `batch_per_device` contigs of `config.model.max_genes` genes.

    `config`: a full training config (model, optimizer, objective, train). Returns the analysis'
    argument, output, temp and alias bytes, and total = argument + output + temp - alias (the
    state is donated, so its outputs reuse the argument buffers), what the step holds at its peak.
    """
    import functools

    import jax.numpy as jnp
    from flax import nnx

    from glm_jax.model.glm import config_from_dict_like, create_model
    from glm_jax.train import optim, trainer

    model = config_from_dict_like(config.model)
    tx, schedule = optim.create_optimizer(config.optimizer, config.train.num_steps)
    abstract_model = nnx.eval_shape(lambda: create_model(model))
    params = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
    state = trainer.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                               opt_state=jax.eval_shape(tx.init, params))
    b, s = batch_per_device, model.max_genes
    batch = {"inputs_embeds": jax.ShapeDtypeStruct((b, s, model.emb_dim), jnp.float32),
             "labels": jax.ShapeDtypeStruct((b, s, model.num_pc), jnp.float32),
             "attention_mask": jax.ShapeDtypeStruct((b, s), jnp.int32)}
    step = jax.jit(functools.partial(trainer.train_step, graphdef=nnx.graphdef(abstract_model), tx=tx,
                                     schedule=schedule, obj=trainer.ObjectiveConfig.from_config(config.objective),
                                     accumulation_steps=config.train.accumulation_steps), donate_argnums=0)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    stats = step.lower(state, batch, rng).compile().memory_analysis()
    out = {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
           "temp": stats.temp_size_in_bytes, "alias": stats.alias_size_in_bytes}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return {k: int(v) for k, v in out.items()}
