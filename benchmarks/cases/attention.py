"""attention: every registered attention implementation vs contig length, forward and forward+backward.

gLM-base heads (10 x 128) by default, contigs of 30 ... 8,192 genes, float32 and bfloat16, batch
chosen so batch x genes stays near --tokens (at least 1 contig). A tenth of each contig is padding.
Each (implementation, length, dtype, pass) is first compiled on abstract shapes; XLA's compiled
memory analysis (arguments + outputs + temporaries, what one call holds at its peak) decides
whether it fits under --memory-cap-gb before anything is allocated: above the cap the record is
`skipped` with reason "over_cap ..."; a compile or run error (e.g. out of memory) is `failed`.
On an accelerator extra.device_peak_bytes is device.memory_stats()'s peak after the call.

The Pallas kernel runs in interpret mode on CPU: correct (tests/test_pallas_attention.py) but
not a performance number, so it is skipped there. Items: genes per second (batch x genes / s).
model_flops: the function's matmuls, 8 B H S^2 d forward (q.k, q.D, k.D, p.v) and 3x that with
the backward, whatever an implementation really executes. ratio_vs_baseline: reference time / time.
"""
from __future__ import annotations

import importlib
import time

CASE = "attention"
LENGTHS = (30, 128, 512, 2048, 8192)
PASSES = ("forward", "forward_backward")


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma-separated genes per contig")
    parser.add_argument("--impls", default="all", help="comma-separated implementation names, or 'all' (the registry)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
    parser.add_argument("--passes", default=",".join(PASSES), help=f"comma-separated, of {PASSES}")
    parser.add_argument("--tokens", type=int, default=8192, help="batch x genes per call (batch >= 1)")
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--memory-cap-gb", type=float, default=None,
                        help="skip calls whose compiled memory exceeds this (default: 8 on CPU, the device's "
                             "memory on an accelerator)")


def implementations(names: str) -> dict:
    """{name: module} from the registry in glm_jax.kernels."""
    from glm_jax import kernels

    chosen = list(kernels.IMPLEMENTATIONS) if names == "all" else names.split(",")
    return {name: importlib.import_module(kernels.IMPLEMENTATIONS[name]) for name in chosen}


def compiled_bytes(compiled) -> int:
    """Arguments + outputs + temporaries of one compiled call (XLA's memory analysis)."""
    stats = compiled.memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def attention_flops(batch: int, genes: int, heads: int, head_dim: int, with_backward: bool) -> int:
    forward = 8 * batch * heads * genes * genes * head_dim
    return 3 * forward if with_backward else forward


def make_call(module, genes: int, with_backward: bool):
    """A jitted call (q, k, v, table, key_mask[, cotangent]) of one implementation."""
    import jax

    def forward(q, k, v, table, key_mask):
        return module.attention(q, k, v, table, key_mask, max_positions=genes, clip_distances=False,
                                relative="relative_key_query")[0]

    if not with_backward:
        return jax.jit(forward)

    def forward_backward(q, k, v, table, key_mask, cotangent):
        out, vjp = jax.vjp(lambda *a: forward(*a, key_mask), q, k, v, table)
        return out, vjp(cotangent.astype(out.dtype))

    return jax.jit(forward_backward)


def inputs(batch: int, genes: int, heads: int, head_dim: int, dtype, abstract: bool):
    """(q, k, v, table, key_mask, cotangent), as ShapeDtypeStructs or random arrays."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    qkv = (batch, genes, heads, head_dim)
    shapes = [(qkv, dtype)] * 3 + [((2 * genes - 1, head_dim), jnp.float32), ((batch, genes), jnp.float32),
                                   (qkv, dtype)]
    if abstract:
        return [jax.ShapeDtypeStruct(shape, dt) for shape, dt in shapes]
    keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
    arrays = [jax.random.normal(key, shape, jnp.float32).astype(dt) for key, (shape, dt) in zip(keys, shapes)]
    mask = np.ones((batch, genes), np.float32)
    mask[:, genes - max(1, genes // 10):] = 0
    arrays[4] = jnp.asarray(mask)
    return arrays


def run(args, recorder) -> None:
    import jax
    import jax.numpy as jnp

    from benchmarks.timing import measured_matmul_peak, time_fn

    accelerator = jax.default_backend() != "cpu"
    device = jax.devices()[0]
    cap_gb = args.memory_cap_gb
    if cap_gb is None:
        limit = (device.memory_stats() or {}).get("bytes_limit") if accelerator else None
        cap_gb = limit / 2 ** 30 if limit else 8.0
    lengths = [30, 128] if args.quick else [int(s) for s in args.lengths.split(",")]
    heads, head_dim = (2, 16) if args.quick else (args.heads, args.head_dim)
    tokens = 256 if args.quick else args.tokens
    dtypes = args.dtypes.split(",")
    passes = args.passes.split(",")
    modules = implementations(args.impls)

    for genes in lengths:
        batch = max(1, tokens // genes)
        for dtype_name in dtypes:
            dtype = jnp.dtype(dtype_name)
            for pass_name in passes:
                with_backward = pass_name == "forward_backward"
                flops = attention_flops(batch, genes, heads, head_dim, with_backward)
                measured = {}
                for name, module in modules.items():
                    common = dict(case=CASE, config=f"genes{genes}_{pass_name}", impl=name, dtype=dtype_name,
                                  batch=batch, model_flops=flops, devices=1, baseline="reference",
                                  shapes={"genes": genes, "heads": heads, "head_dim": head_dim,
                                          "pass": pass_name, "cap_gb": cap_gb})
                    if name == "pallas" and not accelerator:
                        recorder.record(**common, status="skipped", reason="Pallas runs in interpret mode on CPU: "
                                                                           "correct, not a performance number")
                        continue
                    call = make_call(module, genes, with_backward)
                    arity = 6 if with_backward else 5
                    start = time.perf_counter()
                    try:
                        compiled = call.lower(*inputs(batch, genes, heads, head_dim, dtype, True)[:arity]).compile()
                    except Exception as error:  # noqa: BLE001 -- a failing implementation is a result
                        recorder.record(**common, status="failed", reason=f"compile: {type(error).__name__}: "
                                        f"{str(error).splitlines()[0][:300]}")
                        continue
                    compile_s = time.perf_counter() - start
                    memory = compiled_bytes(compiled)
                    extra = {"compiled_bytes": memory}
                    if memory > cap_gb * 2 ** 30:
                        recorder.record(**common, status="skipped", extra=extra,
                                        reason=f"over_cap: compiled memory {memory / 2 ** 30:.2f} GB > {cap_gb:g} GB")
                        continue
                    try:
                        arrays = inputs(batch, genes, heads, head_dim, dtype, False)[:arity]
                        timing = {**time_fn(compiled, *arrays, repeats=args.repeats, warmup=args.warmup),
                                  "compile_s": compile_s}
                    except Exception as error:  # noqa: BLE001 -- out of memory and friends
                        recorder.record(**common, status="failed", extra=extra,
                                        reason=f"run: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
                        continue
                    if accelerator:
                        extra["device_peak_bytes"] = (device.memory_stats() or {}).get("peak_bytes_in_use")
                    measured[name] = timing["median_s"]
                    peak = measured_matmul_peak(dtype_name)
                    recorder.record(
                        **common, **timing, items_per_s=batch * genes / timing["median_s"], items_unit="genes/s",
                        ratio_vs_baseline=(measured["reference"] / timing["median_s"]
                                           if "reference" in measured else None),
                        mfu_measured_peak=flops / timing["median_s"] / peak,
                        extra={**extra, "matmul_peak_flops": peak})
                    del arrays
