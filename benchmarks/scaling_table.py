"""The README's scaling table: parameters, model FLOPs per step and memory per device of each config.

`python benchmarks/run.py report` writes it between the README's `perf:scaling` markers
(`--check` compares). Numbers come from `glm_jax.train.flops` (analytic; FLOPs checked against
XLA in tests/test_flops.py). Memory is per device on the listed mesh, batch split over data x fsdp:
the analytic estimate (without remat savings) and, for data-parallel rows, XLA's compiled memory
analysis of the real train step (`flops.compiled_train_memory_bytes`, abstract shapes, nothing
allocated). Compiling gLM-base at 4,096 genes takes minutes on a CPU, so those numbers are
measured by

    python -m benchmarks.scaling_table --compile     # rewrites benchmarks/results/compiled_memory.json

and the table reads them from that file: a row whose config changed since shows "stale", one never
compiled "not compiled", a row sharded over fsdp/tensor (it would need its mesh) "-".
"""
from __future__ import annotations

import argparse
import hashlib
import json

from benchmarks.recorder import REPO
from glm_jax.config import load_config
from glm_jax.model.glm import config_from_dict_like
from glm_jax.train import flops

# (config file, devices it is sized for, mesh (data, fsdp, tensor) on them)
ROWS = (
    ("configs/quickstart.py", 1, (1, 1, 1)),
    ("configs/glm_base.py", 4, (4, 1, 1)),
    ("configs/glm_1b.py", 8, (1, 8, 1)),
    ("configs/glm_3b.py", 64, (8, 8, 1)),
    ("configs/glm_long.py", 8, (8, 1, 1)),
)
COMPILED_FILE = REPO / "benchmarks" / "results" / "compiled_memory.json"


def _setup(path: str, mesh: tuple[int, int, int]):
    config = load_config(str(REPO / path))
    data, fsdp, _ = mesh
    return config, config.train.batch_size // (data * fsdp)


def compile_key(config, batch_per_device: int) -> str:
    """What the compiled number depends on: the model, optimizer, objective and the batch share."""
    described = {name: config[name].to_dict() for name in ("model", "optimizer", "objective")}
    described["batch_per_device"] = batch_per_device
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def compile_rows() -> dict:
    """Compiles every data-parallel row's train step; {config: {key, total_bytes, ...}}."""
    import jax

    measured = {}
    for path, _, mesh in ROWS:
        if mesh[1] * mesh[2] > 1:
            continue
        config, batch_per_device = _setup(path, mesh)
        memory = flops.compiled_train_memory_bytes(config, batch_per_device)
        measured[path] = {"key": compile_key(config, batch_per_device), "batch_per_device": batch_per_device,
                          "total_bytes": memory["total"], "analysis": memory, "jax": jax.__version__,
                          "backend": jax.default_backend()}
    return measured


def row(path: str, devices: int, mesh: tuple[int, int, int], compiled: dict) -> dict:
    config, batch_per_device = _setup(path, mesh)
    model = config_from_dict_like(config.model)
    genes, batch = model.max_genes, config.train.batch_size
    _, fsdp, tensor = mesh
    memory = flops.memory_per_device_bytes(model, batch_per_device, genes, weight_sharding=fsdp * tensor)
    if fsdp * tensor > 1:
        compiled_gib = "-"
    elif path not in compiled:
        compiled_gib = "not compiled"
    elif compiled[path]["key"] != compile_key(config, batch_per_device):
        compiled_gib = "stale"
    else:
        compiled_gib = f"{compiled[path]['total_bytes'] / 2 ** 30:.2f}"
    return {"config": path, "params": flops.parameter_count(model), "genes": genes, "batch": batch,
            "tflop_per_step": flops.train_flops_per_step(model, batch, genes) / 1e12, "devices": devices,
            "mesh": mesh, "attention": model.attention, "remat": model.remat_policy,
            "state_gib": memory["state"] / 2 ** 30, "activation_gib": memory["activations"] / 2 ** 30,
            "compiled_gib": compiled_gib}


def read_compiled() -> dict:
    return json.loads(COMPILED_FILE.read_text()) if COMPILED_FILE.is_file() else {}


def markdown(compiled: dict | None = None) -> str:
    compiled = read_compiled() if compiled is None else compiled
    lines = ["| config | parameters | genes/contig | batch | model TFLOP/step | devices, mesh (data, fsdp, tensor) "
             "| attention, remat | state GiB/device | activations GiB/device (estimate, no remat) "
             "| XLA compiled GiB/device |",
             "|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in (row(*args, compiled=compiled) for args in ROWS):
        lines.append(f"| `{r['config']}` | {r['params'] / 1e6:,.1f} M | {r['genes']} | {r['batch']} | "
                     f"{r['tflop_per_step']:,.2f} | {r['devices']}, {r['mesh']} | {r['attention']}, {r['remat']} | "
                     f"{r['state_gib']:.2f} | {r['activation_gib']:.2f} | {r['compiled_gib']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help=f"recompile and rewrite {COMPILED_FILE.name}")
    if parser.parse_args().compile:
        from glm_jax.files import write_text_atomic

        write_text_atomic(COMPILED_FILE, json.dumps(compile_rows(), indent=1, sort_keys=True) + "\n")
    print(markdown())
