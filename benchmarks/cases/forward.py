"""forward: inference (last hidden state) of glm-jax vs the PyTorch reference gLM, same weights and batch.

The PyTorch side is `glm_jax.interop.torch_reference` (HF RobertaModel with relative_key_query, the
original's architecture) eagerly and, where it compiles, under `torch.compile`. JAX runs the
jitted NNX forward in float32 (and bfloat16 on an accelerator, against PyTorch float16 autocast
like the original's glm_embed.py). The float32 outputs are compared (extra.max_abs_diff).
Items: contigs (windows) per second.
"""
from __future__ import annotations

import functools

from benchmarks import paired, synthetic

CASE = "forward"


def add_arguments(parser) -> None:
    paired.add_plan_arguments(parser, "32", "comma-separated contigs per call")


def run(args, recorder) -> None:
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from glm_jax.model import checkpoint
    from glm_jax.train import flops

    plan = paired.plan(args, quick_batch=4)
    configs, batches, baselines, device, jax_dtypes = (plan.configs, plan.batches, plan.baselines, plan.device,
                                                       plan.jax_dtypes)
    forward = nnx.jit(lambda model, x, mask: model(x, mask).last_hidden_state)
    for name in configs:
        config = synthetic.MODEL_CONFIGS[name]
        reference, params, missing = paired.paired_models(config)
        reference = reference.eval().to(device) if reference is not None else None
        for batch_size in batches:
            data = synthetic.model_windows(config, batch_size)
            inputs, mask = data["inputs_embeds"], data["attention_mask"].astype(np.float32)
            x_torch, mask_torch = torch.from_numpy(inputs).to(device), torch.from_numpy(mask).to(device)

            def torch_call(module, autocast: str | None):
                def call():
                    with torch.no_grad(), paired.torch_autocast(device, autocast):
                        return module(x_torch, mask_torch)["last_hidden_state"]
                return call

            def jax_call(dtype: str):
                model = checkpoint.model_from_params(config.replace(compute_dtype=dtype), params)
                x_jax, mask_jax = jnp.asarray(inputs), jnp.asarray(mask)
                return lambda: forward(model, x_jax, mask_jax), 1

            float32_outputs = {}

            def compare_outputs(side, call) -> dict:
                """float32 last hidden states: JAX's largest difference from PyTorch eager's."""
                if side.dtype != "float32" or side.impl == "torch_compile":
                    return {}
                out = call()
                float32_outputs[side.impl] = out.cpu().numpy() if hasattr(out, "cpu") else np.asarray(out)
                if side.impl != "jax" or "torch_eager" not in float32_outputs:
                    return {}
                difference = np.abs(float32_outputs["jax"] - float32_outputs["torch_eager"]).max()
                return {"max_abs_diff_vs_torch": float(difference)}

            sides = paired.torch_sides(baselines, device, torch_call, reference, missing)
            sides += [paired.Side("jax", dtype, ("jax", dtype), functools.partial(jax_call, dtype))
                      for dtype in jax_dtypes]
            genes = int(mask.sum())
            shapes = {"genes": synthetic.GENES, "emb_dim": config.emb_dim, "real_genes": genes,
                      "parameters": flops.parameter_count(config)}
            paired.measure(
                recorder, sides, dict(case=CASE, config=name, batch=batch_size, shapes=shapes),
                repeats=args.repeats, warmup=args.warmup, items=batch_size, genes=genes,
                model_flops=batch_size * flops.forward_flops_per_contig(config, synthetic.GENES),
                extra=compare_outputs)
