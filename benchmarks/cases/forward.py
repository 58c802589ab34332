"""forward: inference (last hidden state) of glm-jax vs the PyTorch reference gLM, same weights and batch.

The PyTorch side is `glm_jax.interop.torch_reference` (HF RobertaModel with relative_key_query, the
original's architecture) eagerly and, where it compiles, under `torch.compile`. JAX runs the
jitted NNX forward in float32 (and bfloat16 on an accelerator, against PyTorch float16 autocast
like the original's glm_embed.py). The float32 outputs are compared (extra.max_abs_diff).
Items: contigs (windows) per second.
"""
from __future__ import annotations

from benchmarks import synthetic
from benchmarks.timing import measured_matmul_peak, time_fn

CASE = "forward"


def add_arguments(parser) -> None:
    parser.add_argument("--configs", default="tiny,base", help=f"comma-separated, of {sorted(synthetic.MODEL_CONFIGS)}")
    parser.add_argument("--batch", default="32", help="comma-separated contigs per call")
    parser.add_argument("--baselines", default="eager,compile",
                        help="PyTorch baselines: eager, compile (torch.compile), comma-separated or 'none'")


def run(args, recorder) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from glm_jax.model import checkpoint
    from glm_jax.train import flops

    configs = ["tiny"] if args.quick else args.configs.split(",")
    batches = [4] if args.quick else [int(b) for b in str(args.batch).split(",")]
    baselines = ["eager"] if args.quick else [b for b in args.baselines.split(",") if b != "none"]
    device = synthetic.torch_device()
    accelerator = jax.default_backend() != "cpu"
    forward = nnx.jit(lambda model, x, mask: model(x, mask).last_hidden_state)
    for name in configs:
        config = synthetic.MODEL_CONFIGS[name]
        reference, params = synthetic.paired_models(config)
        reference = reference.eval().to(device)
        for batch_size in batches:
            data = synthetic.model_windows(config, batch_size)
            inputs, mask = data["inputs_embeds"], data["attention_mask"].astype(np.float32)
            x_torch, mask_torch = torch.from_numpy(inputs).to(device), torch.from_numpy(mask).to(device)
            call_flops = batch_size * flops.forward_flops_per_contig(config, synthetic.GENES)
            common = dict(case=CASE, config=name, batch=batch_size, model_flops=call_flops, devices=1,
                          shapes={"genes": synthetic.GENES, "emb_dim": config.emb_dim,
                                  "real_genes": int(mask.sum()), "parameters": flops.parameter_count(config)})

            def torch_call(module, autocast: bool):
                def call():
                    with torch.no_grad(), torch.autocast(device, dtype=torch.float16, enabled=autocast):
                        return module(x_torch, mask_torch)["last_hidden_state"]
                return call

            # (impl, dtype, matmul-peak framework and dtype, no-argument call factory)
            runs = []
            if "eager" in baselines:
                runs.append(("torch_eager", "float32", "torch", "float32", lambda: torch_call(reference, False)))
                if device == "cuda":
                    runs.append(("torch_eager", "float16-autocast", "torch", "float16",
                                 lambda: torch_call(reference, True)))
            if "compile" in baselines:
                runs.append(("torch_compile", "float32", "torch", "float32",
                             lambda: torch_call(torch.compile(reference), False)))
            for dtype in ["float32"] + (["bfloat16"] if accelerator else []):
                def jax_call(dtype=dtype):
                    model = checkpoint.model_from_params(config.replace(compute_dtype=dtype), params)
                    x_jax, mask_jax = jnp.asarray(inputs), jnp.asarray(mask)
                    return lambda: forward(model, x_jax, mask_jax)
                runs.append(("jax", dtype, "jax", dtype, jax_call))

            measured, outputs = {}, {}
            for impl, dtype, framework, peak_dtype, make in runs:
                try:
                    call = make()
                    timing = time_fn(call, repeats=args.repeats, warmup=args.warmup)
                except Exception as error:  # torch.compile without a toolchain, out of memory, ...
                    recorder.record(**common, impl=impl, dtype=dtype, status="failed",
                                    reason=f"{type(error).__name__}: {str(error)[:300]}")
                    continue
                measured[(impl, dtype)] = timing["median_s"]
                if dtype == "float32" and impl in ("jax", "torch_eager"):
                    out = call()
                    outputs[impl] = np.asarray(out.float().cpu().numpy() if hasattr(out, "cpu") else out)
                extra = {}
                if impl == "jax" and dtype == "float32" and "torch_eager" in outputs:
                    extra["max_abs_diff_vs_torch"] = float(np.abs(outputs["jax"] - outputs["torch_eager"]).max())
                baseline = ("torch_eager", "float32" if dtype == "float32" else "float16-autocast") \
                    if impl == "jax" else None
                peak = measured_matmul_peak(peak_dtype, framework)
                recorder.record(
                    **common, impl=impl, dtype=dtype, **timing,
                    items_per_s=batch_size / timing["median_s"], items_unit="contigs/s",
                    baseline=" ".join(baseline) if baseline in measured else None,
                    ratio_vs_baseline=measured[baseline] / timing["median_s"] if baseline in measured else None,
                    mfu_measured_peak=call_flops / timing["median_s"] / peak,
                    extra={**extra, "matmul_peak_flops": peak, "matmul_peak": f"{framework} {peak_dtype}"})
