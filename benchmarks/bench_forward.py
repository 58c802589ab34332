"""Inference throughput of glm-jax vs the PyTorch reference gLM, same weights, same batches, one run.

    python benchmarks/bench_forward.py [--configs tiny,base] [--batch 16] [--repeats 5]

The PyTorch side is `glm_jax.interop.torch_reference` (HF RobertaModel with relative_key_query, the
original's architecture) in eager mode and, where it compiles, `torch.compile`. JAX runs the
jitted forward in fp32 (and bf16 on an accelerator; PyTorch then uses fp16 autocast like the
original's glm_embed.py). Writes benchmarks/results/forward_<platform>.json.
"""
from __future__ import annotations

import argparse

from common import CONFIGS, environment, seconds_per_call, windows, write_results

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from glm_jax.model import checkpoint
from glm_jax.interop import convert
from glm_jax.interop import torch_reference as tr
from glm_jax.model.glm import GLMConfig


def bench_config(name: str, config: GLMConfig, batch_size: int, repeats: int, accelerator: bool) -> dict:
    reference = tr.build_reference(config)
    params, _ = convert.torch_to_params(tr.state_dict_numpy(reference), config)
    data = windows(config, batch_size)
    inputs, mask = data["inputs_embeds"], data["attention_mask"].astype(np.float32)
    device = "cuda" if accelerator and torch.cuda.is_available() else "cpu"
    reference = reference.to(device)
    x_t, m_t = torch.from_numpy(inputs).to(device), torch.from_numpy(mask).to(device)
    x_j, m_j = jnp.asarray(inputs), jnp.asarray(mask)
    result = {"config": name, "batch_contigs": batch_size, "genes_per_contig": 30}

    dtypes = ["float32"] + (["bfloat16"] if accelerator else [])
    for dtype in dtypes:
        model = checkpoint.model_from_params(config.replace(compute_dtype=dtype), params)
        run = nnx.jit(lambda m, x, a: m(x, a).last_hidden_state)
        result[f"jax_{dtype}_s"] = seconds_per_call(lambda: run(model, x_j, m_j).block_until_ready(), repeats)
        if dtype == "float32":
            jax_out = np.asarray(run(model, x_j, m_j))

    def torch_call(module, autocast=False):
        def call():
            with torch.no_grad(), torch.autocast(device, dtype=torch.float16, enabled=autocast):
                out = module(x_t, m_t)["last_hidden_state"]
            if device == "cuda":
                torch.cuda.synchronize()
            return out
        return call

    result["torch_eager_float32_s"] = seconds_per_call(torch_call(reference), repeats)
    torch_out = torch_call(reference)().float().cpu().numpy()
    result["max_abs_diff_fp32"] = float(np.abs(torch_out - jax_out).max())
    if accelerator:
        result["torch_eager_fp16_autocast_s"] = seconds_per_call(torch_call(reference, True), repeats)
    try:
        compiled = torch.compile(reference)
        result["torch_compile_float32_s"] = seconds_per_call(torch_call(compiled), repeats)
    except Exception as error:  # torch.compile needs a working C++ toolchain / triton
        result["torch_compile_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    for key in [k for k in result if k.endswith("_s")]:
        result[key.replace("_s", "_contigs_per_s")] = batch_size / result[key]
    result["speedup_jax_fp32_vs_torch_eager_fp32"] = result["torch_eager_float32_s"] / result["jax_float32_s"]
    if "torch_compile_float32_s" in result:
        result["speedup_jax_fp32_vs_torch_compile_fp32"] = result["torch_compile_float32_s"] / result["jax_float32_s"]
    if accelerator:
        result["speedup_jax_bf16_vs_torch_fp16_autocast"] = (result["torch_eager_fp16_autocast_s"]
                                                           / result["jax_bfloat16_s"])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,base")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    accelerator = jax.default_backend() != "cpu"
    results = {
        **environment(),
        "runs": [bench_config(name, CONFIGS[name], args.batch, args.repeats, accelerator)
                 for name in args.configs.split(",")],
    }
    write_results("forward", results)


if __name__ == "__main__":
    main()
