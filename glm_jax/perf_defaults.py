"""Performance defaults that depend on the platform, in one place.

Each entry was chosen by a measurement on that platform (see docs/performance.md);
a platform without a measurement keeps the value the code had before, except where the entry's
comment says why not (`esm2_attention` on GPUs: cuDNN's fused kernel, not yet measured here).
Values change speed only, never results beyond float32 summation order.
"""
from __future__ import annotations

import os
import pathlib
import sys
from platform import libc_ver

PLATFORM_DEFAULTS = {
    # ESM2 attention runs over blocks of this many queries (a softmax over all keys per block). On
    # CPU, 64 queries: ESM2-8M attention 1.8x faster at 32 x 384 tokens and 1.6x at 8 x 1536 than
    # the earlier online softmax over 64-key blocks; 128 is as fast at 384 tokens but 3x slower at
    # 1536, 16-32 are 1.2-1.5x slower (interleaved, one process, 2 threads).
    "esm2_query_block": {"cpu": 64, "default": 512},
    # ESM2 attention in 16-bit compute (float32 always uses query blocks; `esm2.default_attention`).
    # GPU: jax.nn.dot_product_attention, i.e. cuDNN's fused flash attention on NVIDIA, chosen without
    # a measurement here (no GPU was lent yet): `benchmarks/run.py esm2 --attention
    # query_blocks,dot_product --dtypes bfloat16` compares the two. CPU: query blocks, whole ESM2-8M
    # 1.8x (32 x 384 tokens) and 2.5x (8 x 1,536) faster than with XLA's dot_product_attention in bf16.
    "esm2_attention": {"gpu": "dot_product", "default": "query_blocks"},
    # gLM blockwise attention: queries per block (each block's scores against all keys are one
    # [batch, heads, block, genes] array) and keys per chunk of its k.D term (flops (block + chunk)
    # / block times q.k's). CPU: blocks of 256 vs 128, forward+backward 1.07x at 512 genes (batch 16),
    # 1.07x at 2,048 (batch 4), interleaved in one process; see kernels/blockwise.py.
    "attention_query_block": {"cpu": 256, "default": 512},
    "attention_key_chunk": {"cpu": 32, "default": 64},
    # gLM layers in bf16 under lax.scan. XLA:CPU rewrites each bf16 dynamic-update-slice inside a
    # loop (the scan's stacked residuals and weight gradients) into a convert of the whole stacked
    # buffer to f32 and back, once per layer: traffic quadratic in depth, 27% of gLM-base's bf16
    # step (batch 8: 2.52 s scanned, 1.85 s unrolled, interleaved in one process). So on CPU bf16
    # layers run unrolled whatever `scan_layers` says (same function; float32 keeps the scan).
    "scan_low_precision_layers": {"cpu": False, "default": True},
}


def platform_default(name: str, platform: str | None = None):
    """The value of `PLATFORM_DEFAULTS[name]` for `platform` (default: JAX's default backend)."""
    import jax  # here, so that `restart_with_huge_pages` runs before jax is loaded

    values = PLATFORM_DEFAULTS[name]
    return values.get(platform or jax.default_backend(), values["default"])


# glibc's malloc puts each large buffer (XLA's and PyTorch's CPU arrays: weights, gradients,
# optimizer moments, activations) in fresh mmap'd 4 KiB pages, so every train step page-faults
# ~1.8 GB in again: 448k minor faults and ~0.9 CPU-s of kernel time per gLM-base step (batch 8,
# fp32, measured with getrusage). With transparent huge pages for malloc (glibc >= 2.35) the same
# step takes ~1.2k faults; an elementwise pass over a 300 MB array is 2.4x faster.
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_SWITCH = "GLM_JAX_HUGE_PAGES"  # "0" keeps the process as it was started
# PyTorch's CPU tensors come straight from malloc, and glibc still maps each one above its
# (dynamic) mmap threshold afresh and returns freed heap tops to the kernel, so every eager step
# zero-fills and faults its buffers in again: gLM-base's eager fp32 step (batch 8) takes ~4.2 s,
# 2.85 s with both limits fixed (mmap threshold alone: ~3.4 s; trim threshold alone: no change).
# JAX's step is the same either way (3.0-3.1 s). The benchmarks run both frameworks with these,
# so that PyTorch is compared as a tuned install would run it (jemalloc/tcmalloc do the same).
REUSING_MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold=33554432", "glibc.malloc.trim_threshold=4294967296")


def glibc_has_huge_page_tunable() -> bool:
    """Linux with glibc >= 2.35, whose malloc reads `HUGE_PAGE_TUNABLE` (older ones ignore it)."""
    libc, version = libc_ver()
    return (sys.platform.startswith("linux") and libc == "glibc"
            and tuple(int(part) for part in version.split(".")[:2]) >= (2, 35))


def restart_with_huge_pages(extra_tunables: tuple[str, ...] = ()) -> None:
    """Re-executes this Python process once with `HUGE_PAGE_TUNABLE` (and `extra_tunables`, e.g.
    `REUSING_MALLOC_TUNABLES`) in GLIBC_TUNABLES.

    glibc reads its tunables only at start-up, so a program entry point (the `glm-jax` command,
    benchmarks/run.py) calls this before doing any work. No-op off Linux/glibc < 2.35, when the
    tunables are already set, or with GLM_JAX_HUGE_PAGES=0.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    missing = [t for t in (HUGE_PAGE_TUNABLE, *extra_tunables) if t not in tunables.split(":")]
    if not glibc_has_huge_page_tunable() or not missing or os.environ.get(HUGE_PAGES_SWITCH, "1") == "0":
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, *missing])))
    env[HUGE_PAGES_SWITCH] = "0"  # never loop, even where glibc drops the variable
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        pass  # keep running with the default allocator


# XLA compilations are written to a persistent cache, so a rerun of a command (a resumed training
# run, the next genome through `infer` or `embed-proteins`) loads its executables instead of
# compiling them again: gLM-base's CPU train step 6.4 s -> 1.5 s; 600 proteins through
# `embed-proteins` (ESM2-8M, 38 length-bucket programs of 0.2-1 s each) 41.6 s -> 33.8 s. JAX keys
# each entry by the program, the compile options, the backend and its own version.
COMPILATION_CACHE_SWITCH = "GLM_JAX_COMPILATION_CACHE"  # a folder, or "0" for no cache
COMPILATION_CACHE_MAX_BYTES = 2 << 30                    # least recently used entries go first
COMPILATION_CACHE_MIN_SECONDS = 0.2                      # JAX's default (1 s) skips every ESM2 bucket


def default_compilation_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "glm-jax" / "xla-compilation-cache"


def enable_compilation_cache() -> pathlib.Path | None:
    """Turns on JAX's persistent compilation cache in $GLM_JAX_COMPILATION_CACHE (default
    `default_compilation_cache_dir()`) for a program that has not imported jax yet (the `glm-jax`
    command), through the environment JAX reads at import. Returns the folder, or None when
    switched off ("0"), when JAX_COMPILATION_CACHE_DIR is already set (it wins), or when the folder
    cannot be created (then commands run as before, compiling every time)."""
    setting = os.environ.get(COMPILATION_CACHE_SWITCH, "")
    if setting == "0" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    folder = pathlib.Path(setting) if setting else default_compilation_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    try:  # jax keeps the cache under a size cap only with filelock; without it a cap disables the cache
        import filelock  # noqa: F401
        os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(COMPILATION_CACHE_MAX_BYTES))
    except ImportError:
        pass
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(COMPILATION_CACHE_MIN_SECONDS))
    return folder
