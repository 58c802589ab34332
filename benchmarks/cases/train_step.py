"""train_step: one optimizer step of glm-jax vs the PyTorch reference gLM, same weights and batch.

One step = mask 15% of genes, forward, the original loss, backward, AdamW update. JAX runs the
trainer's `train_step` jitted with donated state on a data mesh of all local devices; PyTorch runs
`glm_jax.interop.torch_reference` + `original_loss` + `torch.optim.AdamW` eagerly and, where it
compiles, under `torch.compile`. float32 on both sides; also JAX bfloat16 vs PyTorch float16
autocast on a GPU (how the original trained) and vs PyTorch bfloat16 autocast on a CPU with a
native bf16 matmul (`paired.autocast_dtype`). Items: contigs (windows) per second.
"""
from __future__ import annotations

import functools

from benchmarks import paired, synthetic
from benchmarks.recorder import REPO

CASE = "train_step"


def add_arguments(parser) -> None:
    paired.add_plan_arguments(parser, "8", "comma-separated contigs per step, e.g. 8,32")


def jax_step(config, params: dict, batch: dict):
    """-> (a no-argument function running one jitted trainer step, state donated and carried;
    the number of devices it runs on)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from glm_jax import sharding
    from glm_jax.config import load_config
    from glm_jax.model import checkpoint
    from glm_jax.train import optim
    from glm_jax.train import trainer

    run_config = load_config(str(REPO / "configs" / "glm_base.py"))  # the optimizer gLM-base trains with
    tx, schedule = optim.create_optimizer(run_config.optimizer, 10_000)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    with sharding.use_mesh(mesh):
        shardings = trainer.state_shardings(config, tx, mesh)
        state = jax.device_put(trainer.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params)),
                               shardings)
        graphdef = nnx.graphdef(checkpoint.model_from_params(config, params))
        step = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                                         obj=trainer.ObjectiveConfig(), accumulation_steps=1),
                       in_shardings=(shardings, sharding.batch_sharding(mesh), None), donate_argnums=0)
        device_batch = trainer.device_batch(batch, sharding.batch_sharding(mesh))
    rng = jax.random.key(0)
    holder = {"state": state}

    def call():
        with sharding.use_mesh(mesh):
            holder["state"], metrics = step(holder["state"], device_batch, rng)
        return metrics["loss"]

    return call, jax.device_count()


def torch_step(module, autocast: str | None, *, batch: dict, device: str):
    """-> a no-argument function running the original's step: mask 15% of genes, forward, loss,
    backward, AdamW; under `autocast` ("float16" with a GradScaler, as the original; "bfloat16")."""
    import torch

    from glm_jax.interop import torch_reference

    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, eps=1e-6, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device, enabled=autocast == "float16")
    x = torch.from_numpy(batch["inputs_embeds"]).to(device)
    labels = torch.from_numpy(batch["labels"]).clamp(-10, 10).to(device)
    mask = torch.from_numpy(batch["attention_mask"]).float().to(device)
    generator = torch.Generator().manual_seed(0)

    def call():
        masked = (torch.rand(mask.shape, generator=generator) < 0.15).to(device) & (mask != 0)
        inputs = torch.where(masked[..., None], torch.full_like(x, -1.0), x)
        optimizer.zero_grad(set_to_none=True)
        with paired.torch_autocast(device, autocast):
            out = module(inputs, mask)
        loss = torch_reference.original_loss(out["predictions"].float(), out["logits"].float(), labels, masked)[0]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    return call


def run(args, recorder) -> None:
    from glm_jax.train import flops

    plan = paired.plan(args, quick_batch=8)
    configs, batches, baselines, device, jax_dtypes = (plan.configs, plan.batches, plan.baselines, plan.device,
                                                       plan.jax_dtypes)
    for name in configs:
        config = synthetic.MODEL_CONFIGS[name]
        reference, params, missing = paired.paired_models(config)
        reference = reference.train().to(device) if reference is not None else None
        for batch_size in batches:
            batch = synthetic.model_windows(config, batch_size)
            genes = int(batch["attention_mask"].sum())
            sides = paired.torch_sides(baselines, device, functools.partial(torch_step, batch=batch, device=device),
                                       reference, missing)
            sides += [paired.Side("jax", dtype, ("jax", dtype),
                                  functools.partial(jax_step, config.replace(compute_dtype=dtype), params, batch))
                      for dtype in jax_dtypes]
            paired.measure(
                recorder, sides, dict(case=CASE, config=name, batch=batch_size,
                                      shapes={"genes": synthetic.GENES, "emb_dim": config.emb_dim, "real_genes": genes,
                                              "parameters": flops.parameter_count(config)}),
                repeats=args.repeats, warmup=args.warmup, items=batch_size, genes=genes,
                model_flops=flops.train_flops_per_step(config, batch_size, synthetic.GENES))
