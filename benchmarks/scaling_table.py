"""The README's scaling table: parameters, model FLOPs per step and memory per device of each config.

    python benchmarks/scaling_table.py            # prints the Markdown table
    python benchmarks/scaling_table.py --check    # exit 1 unless README.md holds exactly this table

Numbers come from `glm_jax.train.flops` (analytic; FLOPs checked against XLA in tests/test_flops.py).
Memory is per device on the listed mesh, without remat savings, batch split over data x fsdp.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glm_jax.train import flops  # noqa: E402
from glm_jax.config import load_config  # noqa: E402
from glm_jax.model.glm import config_from_dict_like  # noqa: E402

# (config file, devices it is sized for, mesh (data, fsdp, tensor) on them)
ROWS = (
    ("configs/quickstart.py", 1, (1, 1, 1)),
    ("configs/glm_base.py", 4, (4, 1, 1)),
    ("configs/glm_1b.py", 8, (1, 8, 1)),
    ("configs/glm_3b.py", 64, (8, 8, 1)),
)
BEGIN, END = "<!-- scaling-table:begin -->", "<!-- scaling-table:end -->"


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
    lines = [BEGIN,
             "| config | parameters | genes/contig | batch | model TFLOP/step | devices, mesh (data, fsdp, tensor) "
             "| state GiB/device | activations GiB/device (no remat) |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in map(lambda args: row(*args), ROWS):
        lines.append(f"| `{r['config']}` | {r['params'] / 1e6:,.1f} M | {r['genes']} | {r['batch']} | "
                     f"{r['tflop_per_step']:,.2f} | {r['devices']}, {r['mesh']} | {r['state_gib']:.2f} | "
                     f"{r['activation_gib']:.2f} |")
    return "\n".join(lines + [END])


def readme_table(readme: pathlib.Path) -> str:
    text = readme.read_text()
    return text[text.index(BEGIN):text.index(END) + len(END)] if BEGIN in text else ""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    table = markdown()
    if args.check:
        sys.exit(0 if readme_table(REPO / "README.md") == table else 1)
    print(table)
