"""glm-jax against the PyTorch reference gLM: the same weights, timed one after the other in one run."""
from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Callable

from benchmarks.timing import measured_matmul_peak, time_fn

# CPU flags of a native bf16 matmul (Zen 4, Sapphire Rapids): there bf16 runs at ~2x the fp32 rate
# in both frameworks (XLA's YNNPACK, PyTorch's oneDNN), so both are also measured in bf16
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def autocast_dtype(device: str) -> str | None:
    """The PyTorch autocast dtype that JAX bfloat16 is set against on `device`: float16 on CUDA
    (the original trained and embedded in float16 autocast), bfloat16 on a CPU with a native bf16
    matmul, None elsewhere (no low-precision pair)."""
    if device == "cuda":
        return "float16"
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return None
    return "bfloat16" if device == "cpu" and flags & set(NATIVE_BF16_CPU_FLAGS) else None


def baseline_of(jax_dtype: str, device: str) -> tuple[str, str] | None:
    """What a JAX measurement in `jax_dtype` is compared with: PyTorch eager in float32, or in
    the autocast dtype of `autocast_dtype`."""
    if jax_dtype == "float32":
        return ("torch_eager", "float32")
    autocast = autocast_dtype(device)
    return ("torch_eager", f"{autocast}-autocast") if autocast else None


def torch_autocast(device: str, dtype: str | None):
    """torch.autocast in `dtype` ("float16", "bfloat16"), or a disabled one for None."""
    import torch

    return torch.autocast(device, dtype=getattr(torch, dtype or "float16"), enabled=dtype is not None)


@dataclasses.dataclass(frozen=True)
class Side:
    """One implementation to time: `make()` -> (no-argument call, devices it runs on)."""
    impl: str  # "jax", "torch_eager", "torch_compile"
    dtype: str  # "float32", "bfloat16", "float16-autocast", "bfloat16-autocast"
    peak: tuple[str, str]  # (framework, dtype) of the matmul rate its MFU is measured against
    make: Callable[[], tuple[Callable, int]]


class Unavailable(RuntimeError):
    """A side that cannot run here (recorded as skipped, with this message as the reason)."""


def paired_models(config, seed: int = 0):
    """-> (the PyTorch reference gLM with random weights, the same weights as glm-jax params, None),
    or where the reference cannot be built (no torch; transformers 5, which drops the relative
    positions) (None, glm-jax's own random params, why)."""
    try:
        from glm_jax.interop import convert
        from glm_jax.interop import torch_reference

        reference = torch_reference.build_reference(config, seed)
    except (ImportError, RuntimeError) as error:
        from glm_jax.model import checkpoint
        from glm_jax.model.glm import create_model

        return None, checkpoint.params_as_dict(create_model(config, seed)), f"{type(error).__name__}: {error}"
    params, _ = convert.torch_to_params(torch_reference.state_dict_numpy(reference), config)
    return reference, params, None


def torch_device() -> str:
    """"cuda" when jax runs on a GPU and torch sees one, else "cpu": both sides on the same hardware."""
    import jax

    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a paired case measures, from its shared options (--configs, --batch, --baselines, --quick)."""
    configs: list[str]
    batches: list[int]
    baselines: list[str]
    device: str  # where the PyTorch side runs (`torch_device`)
    jax_dtypes: list[str]  # float32, plus bfloat16 on accelerators and on CPUs with a native bf16 matmul


def comma_separated(choices, what: str) -> Callable[[str], list[str]]:
    """An argparse `type`: comma-separated names, each one of `choices`; any other is a usage error
    ("unknown WHAT [...]; choose from [...]") before the case runs."""
    def names(text: str) -> list[str]:
        listed = text.split(",")
        unknown = [name for name in listed if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {sorted(choices)}")
        return listed

    return names


def add_plan_arguments(parser, default_batch: str, batch_help: str) -> None:
    """The options `plan` reads, shared by the paired cases."""
    from benchmarks import synthetic

    parser.add_argument("--configs", type=comma_separated(synthetic.MODEL_CONFIGS, "config"), default="tiny,base",
                        help=f"comma-separated, of {sorted(synthetic.MODEL_CONFIGS)}")
    parser.add_argument("--batch", default=default_batch, help=batch_help)
    parser.add_argument("--baselines", default="eager,compile",
                        help="PyTorch baselines: eager, compile (torch.compile), comma-separated or 'none'")


def plan(args, quick_batch: int) -> Plan:
    """The measurements of `args`; --quick: the tiny config at `quick_batch` contigs, eager only."""
    import jax

    device = torch_device()
    low_precision = jax.default_backend() != "cpu" or autocast_dtype(device) is not None
    return Plan(configs=["tiny"] if args.quick else args.configs,
                batches=[quick_batch] if args.quick else [int(b) for b in str(args.batch).split(",")],
                baselines=["eager"] if args.quick else args.baselines.split(","),
                device=device,
                jax_dtypes=["float32"] + (["bfloat16"] if low_precision and not args.quick else []))


def torch_sides(baselines: list[str], device: str, make: Callable[[object, str | None], Callable], reference,
                missing: str | None = None) -> list[Side]:
    """The PyTorch sides asked for: eager float32 (+ eager in `autocast_dtype(device)` where there is
    one), torch.compile float32. make(module, autocast dtype or None) -> call. Without a reference
    (`missing` says why) one skipped side."""
    if reference is None:
        def unavailable():
            raise Unavailable(f"no PyTorch reference: {missing}")
        return [Side("torch_eager", "float32", ("torch", "float32"), unavailable)]
    import torch

    sides = []
    if "eager" in baselines:
        sides.append(Side("torch_eager", "float32", ("torch", "float32"), lambda: (make(reference, None), 1)))
        autocast = autocast_dtype(device)
        if autocast:
            sides.append(Side("torch_eager", f"{autocast}-autocast", ("torch", autocast),
                              lambda: (make(reference, autocast), 1)))
    if "compile" in baselines:
        sides.append(Side("torch_compile", "float32", ("torch", "float32"),
                          lambda: (make(torch.compile(reference), None), 1)))
    return sides


def measure(recorder, sides: list[Side], common: dict, *, repeats: int, warmup: int, items: int, genes: int,
            model_flops: float, extra: Callable[[Side, Callable], dict] = lambda side, call: {}) -> None:
    """Times every side in order (PyTorch first, so JAX records carry their baseline) and records
    each: contigs/s (`items` per call), extra.genes_per_s (real genes, `genes` per call), MFU
    against the side's own framework's matmul rate, `extra(side, call)`, and for
    JAX the ratio to its `baseline_of` (and to torch.compile in extra). A side that fails (e.g.
    torch.compile without a compiler, out of memory) is recorded as failed."""
    measured = {}
    for side in sides:
        try:
            call, devices = side.make()
            timing = time_fn(call, repeats=repeats, warmup=warmup)
        except Unavailable as why:
            recorder.record(**common, impl=side.impl, dtype=side.dtype, status="skipped", reason=str(why)[:300])
            continue
        except Exception as error:  # a failing side is a result, not the end of the run
            recorder.record(**common, impl=side.impl, dtype=side.dtype, status="failed",
                            reason=f"{type(error).__name__}: {str(error)[:300]}")
            continue
        seconds = timing["median_s"]
        measured[(side.impl, side.dtype)] = seconds
        baseline = baseline_of(side.dtype, torch_device()) if side.impl == "jax" else None
        details = {"genes_per_s": genes / seconds, **extra(side, call)}
        if side.impl == "jax" and ("torch_compile", side.dtype) in measured:
            details["ratio_vs_torch_compile"] = measured[("torch_compile", side.dtype)] / seconds
        peak = measured_matmul_peak(side.peak[1], side.peak[0])
        recorder.record(**common, impl=side.impl, dtype=side.dtype, devices=devices, model_flops=model_flops,
                        **timing, items_per_s=items / seconds, items_unit="contigs/s",
                        baseline=" ".join(baseline) if baseline in measured else None,
                        ratio_vs_baseline=measured[baseline] / seconds if baseline in measured else None,
                        mfu_measured_peak=model_flops / seconds / (devices * peak),
                        extra={**details, "matmul_peak_flops": peak, "matmul_peak": " ".join(side.peak)})
