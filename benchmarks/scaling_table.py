"""The README's scaling table: parameters, model FLOPs per step and memory per device of each config.

`python benchmarks/run.py report` writes it between the README's `perf:scaling` markers
(`--check` compares). Numbers come from `glm_jax.train.flops` (analytic; FLOPs checked against
XLA in tests/test_flops.py). Memory is per device on the listed mesh, without remat savings,
batch split over data x fsdp.
"""
from __future__ import annotations

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
)


def row(path: str, devices: int, mesh: tuple[int, int, int]) -> dict:
    config = load_config(str(REPO / path))
    model = config_from_dict_like(config.model)
    genes, batch = model.max_genes, config.train.batch_size
    data, fsdp, tensor = mesh
    memory = flops.memory_per_device_bytes(model, batch // (data * fsdp), genes, weight_sharding=fsdp * tensor)
    return {"config": path, "params": flops.parameter_count(model), "genes": genes, "batch": batch,
            "tflop_per_step": flops.train_flops_per_step(model, batch, genes) / 1e12, "devices": devices,
            "mesh": mesh, "state_gib": memory["state"] / 2 ** 30, "activation_gib": memory["activations"] / 2 ** 30}


def markdown() -> str:
    lines = ["| config | parameters | genes/contig | batch | model TFLOP/step | devices, mesh (data, fsdp, tensor) "
             "| state GiB/device | activations GiB/device (no remat) |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in map(lambda args: row(*args), ROWS):
        lines.append(f"| `{r['config']}` | {r['params'] / 1e6:,.1f} M | {r['genes']} | {r['batch']} | "
                     f"{r['tflop_per_step']:,.2f} | {r['devices']}, {r['mesh']} | {r['state_gib']:.2f} | "
                     f"{r['activation_gib']:.2f} |")
    return "\n".join(lines)
