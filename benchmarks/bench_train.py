"""Training-step throughput and MFU of glm-jax vs the PyTorch reference gLM, same weights, one run.

    python benchmarks/bench_train.py [--configs tiny,base] [--batch 8] [--repeats 5]

One step = mask genes, forward, the original loss, backward, AdamW update. JAX runs
`glm_jax.train.trainer.train_step` (the function the trainer jits) on all local devices in a data mesh;
PyTorch runs `glm_jax.interop.torch_reference` + `original_loss` + `torch.optim.AdamW` in eager mode
and, where it compiles, under `torch.compile`. On CPU, MFU is against a measured float32 matmul
peak (no data-sheet peak exists); on GPU/TPU against the bf16 data-sheet peak, with JAX also
in bfloat16 (PyTorch then uses fp16 autocast, as the original trained). GPU-ready: needs no
TensorFlow (random in-memory windows). Writes benchmarks/results/train_<platform>.json.
"""
from __future__ import annotations

import argparse
import functools

from common import CONFIGS, GENES, REPO, environment, seconds_per_call, windows, write_results

import jax
import jax.numpy as jnp
import torch
from flax import nnx

from glm_jax import sharding  # noqa: E402
from glm_jax.model import checkpoint  # noqa: E402
from glm_jax.interop import convert  # noqa: E402
from glm_jax.train import flops  # noqa: E402
from glm_jax.train import optim  # noqa: E402
from glm_jax.train import trainer as train  # noqa: E402
from glm_jax.interop import torch_reference as tr  # noqa: E402
from glm_jax.config import load_config  # noqa: E402
from glm_jax.model.glm import GLMConfig  # noqa: E402


def measured_matmul_peak(dtype=jnp.float32, n: int = 2048) -> float:
    """FLOP/s of a large jitted matmul on one device: the practical peak where no data sheet applies."""
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / seconds_per_call(lambda: matmul(a).block_until_ready(), 5)


def jax_step_seconds(config: GLMConfig, params: dict, batch: dict, repeats: int) -> float:
    """Median seconds of the trainer's jitted step (donated state) on a data mesh of all devices."""
    run_config = load_config(str(REPO / "configs" / "glm_base.py"))
    tx, schedule = optim.create_optimizer(run_config.optimizer, 10_000)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    with sharding.use_mesh(mesh):
        shardings = train.state_shardings(config, tx, mesh)
        state = jax.device_put(train.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params)), shardings)
        graphdef = nnx.graphdef(checkpoint.model_from_params(config, params))
        step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                                         obj=train.ObjectiveConfig(), accumulation_steps=1),
                       in_shardings=(shardings, sharding.batch_sharding(mesh), None), donate_argnums=0)
        device_batch = train.device_batch(batch, sharding.batch_sharding(mesh))
        rng = jax.random.key(0)
        holder = {"state": state}

        def call():
            holder["state"], metrics = step(holder["state"], device_batch, rng)
            jax.block_until_ready(metrics["loss"])

        return seconds_per_call(call, repeats)


def torch_step(module, batch: dict, device: str, autocast: bool):
    """The original's training step: mask 15% of genes, forward, loss, backward, AdamW."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, eps=1e-6, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device, enabled=autocast)
    x = torch.from_numpy(batch["inputs_embeds"]).to(device)
    labels = torch.from_numpy(batch["labels"]).clamp(-10, 10).to(device)
    mask = torch.from_numpy(batch["attention_mask"]).float().to(device)
    generator = torch.Generator().manual_seed(0)

    def call():
        masked = ((torch.rand(mask.shape, generator=generator) < 0.15).to(device) & (mask != 0))
        inputs = torch.where(masked[..., None], torch.full_like(x, -1.0), x)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.float16, enabled=autocast):
            out = module(inputs, mask)
        loss = tr.original_loss(out["predictions"].float(), out["logits"].float(), labels, masked)[0]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device == "cuda":
            torch.cuda.synchronize()

    return call


def bench_config(name: str, config: GLMConfig, batch_size: int, repeats: int, accelerator: bool, cpu_peak: float) -> dict:
    reference = tr.build_reference(config).train()
    params, _ = convert.torch_to_params(tr.state_dict_numpy(reference), config)
    batch = windows(config, batch_size)
    genes = int(batch["attention_mask"].sum())
    step_flops = flops.train_flops_per_step(config, batch_size, GENES)
    result = {"config": name, "parameters": flops.parameter_count(config), "batch_contigs": batch_size,
              "genes_per_contig": GENES, "real_genes_per_batch": genes, "model_flops_per_step": step_flops}
    peak = flops.peak_flops_per_device() or cpu_peak
    for dtype in ["float32"] + (["bfloat16"] if accelerator else []):
        seconds = jax_step_seconds(config.replace(compute_dtype=dtype), params, batch, repeats)
        result[f"jax_{dtype}_step_s"] = seconds
        result[f"jax_{dtype}_mfu"] = flops.mfu(step_flops, seconds, jax.device_count(), peak)
    device = "cuda" if accelerator and torch.cuda.is_available() else "cpu"
    reference = reference.to(device)
    result["torch_eager_float32_step_s"] = seconds_per_call(torch_step(reference, batch, device, False), repeats)
    if device == "cuda":
        result["torch_eager_fp16_autocast_step_s"] = seconds_per_call(torch_step(reference, batch, device, True), repeats)
    try:
        compiled = torch.compile(reference)
        result["torch_compile_float32_step_s"] = seconds_per_call(torch_step(compiled, batch, device, False), repeats)
    except Exception as error:  # torch.compile needs a working C++ toolchain / triton
        result["torch_compile_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    for key in [k for k in result if k.endswith("_step_s")]:
        result[key.replace("_step_s", "_genes_per_s")] = genes / result[key]
        result[key.replace("_step_s", "_steps_per_s")] = 1 / result[key]
    for key in ("torch_eager_float32", "torch_compile_float32"):
        if f"{key}_step_s" in result:
            result[f"speedup_jax_float32_vs_{key}"] = result[f"{key}_step_s"] / result["jax_float32_step_s"]
    if "torch_eager_fp16_autocast_step_s" in result:
        result["speedup_jax_bfloat16_vs_torch_fp16_autocast"] = (result["torch_eager_fp16_autocast_step_s"]
                                                               / result["jax_bfloat16_step_s"])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,base")
    parser.add_argument("--batch", type=int, default=8, help="contigs per step")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    accelerator = jax.default_backend() != "cpu"
    cpu_peak = measured_matmul_peak()
    results = {
        **environment(),
        "mfu_peak_flops_per_device": flops.peak_flops_per_device() or cpu_peak,
        "mfu_peak_source": "data sheet, bf16 dense" if flops.peak_flops_per_device() else "measured fp32 2048^3 matmul",
        "runs": [bench_config(name, CONFIGS[name], args.batch, args.repeats, accelerator, cpu_peak)
                 for name in args.configs.split(",")],
    }
    write_results("train", results)


if __name__ == "__main__":
    main()
