"""Wall-clock timing of device work, and the matmul rate that MFU on CPUs is measured against."""
from __future__ import annotations

import functools
import statistics
import sys
import time


def wait(out) -> None:
    """Blocks until `out` (a pytree of jax arrays, torch tensors or anything else) is computed."""
    import jax

    leaves = [leaf for leaf in jax.tree_util.tree_leaves(out) if hasattr(leaf, "block_until_ready")]
    jax.block_until_ready(leaves)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_fn(fn, *args, repeats: int = 5, warmup: int = 1) -> dict:
    """Times `fn(*args)` -> dict(median_s, min_s, max_s, repeats, compile_s).

    The first of `warmup` (>= 1) untimed calls pays compilation (jit, torch.compile), autotuning
    and allocator warm-up; `compile_s` is its time minus the median, the one-off cost."""
    if warmup < 1 or repeats < 1:
        raise ValueError(f"warmup ({warmup}) and repeats ({repeats}) must be >= 1")
    start = time.perf_counter()
    wait(fn(*args))
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        wait(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        wait(fn(*args))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"median_s": median, "min_s": min(times), "max_s": max(times), "repeats": repeats,
            "compile_s": max(first - median, 0.0)}


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(dtype: str = "float32", framework: str = "jax", n: int | None = None) -> float:
    """FLOP/s of a square n x n x n matmul in `framework` ("jax" or "torch") and `dtype` on the
    first device (n: 2048 on CPU, 8192 on accelerators): the practical peak that
    `mfu_measured_peak` divides by, measured in the same process as the numbers it normalises."""
    import jax

    accelerator = jax.default_backend() != "cpu"
    n = n or (8192 if accelerator else 2048)
    if framework == "jax":
        import jax.numpy as jnp

        a = jnp.ones((n, n), dtype)
        # float32 accumulation, as the model's dots: XLA:CPU runs bf16 x bf16 -> bf16 at the f32 rate
        matmul = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
        seconds = time_fn(matmul, a, repeats=5)["median_s"]
    elif framework == "torch":
        import torch

        device = "cuda" if accelerator and torch.cuda.is_available() else "cpu"
        a = torch.ones((n, n), dtype=getattr(torch, dtype), device=device)
        seconds = time_fn(torch.matmul, a, a, repeats=5)["median_s"]
    else:
        raise ValueError(f"framework must be 'jax' or 'torch', got {framework!r}")
    return 2 * n ** 3 / seconds
