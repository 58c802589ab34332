"""Helpers shared by the test modules: config files, random contig windows, tiny training runs.

Test modules import from here and never from each other; scripts that tests run in a subprocess
live in `tests/scripts/` and import from here too (the tests directory is on their PYTHONPATH).
"""
from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

from glm_jax.config import load_config
from glm_jax.model.glm import GLMConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"
SCRIPTS_DIR = TESTS_DIR / "scripts"

GENES = 30          # genes per contig window, as the original
NUM_WINDOWS = 96    # windows of the in-memory training set of `readers`

# The small windows of the shard tests: genes, features per gene, label size.
SHARD_GENES, SHARD_EMB_DIM, SHARD_NUM_PC = 6, 5, 3

# A 3-layer gLM for parity tests against the PyTorch reference, and their tolerance (float32,
# activations of order 1 after LayerNorm).
TINY_MODEL = GLMConfig(emb_dim=33, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                       max_position_embeddings=40, num_pc=12, max_genes=30)
PARITY_ATOL = 1e-4


def repo_config(name: str):
    """`get_config()` of configs/<name>.py, as `glm-jax train --config` loads it."""
    return load_config(str(REPO_ROOT / "configs" / f"{name}.py"))


# --- random contig windows -------------------------------------------------------------------

def padding_mask(lengths, genes: int) -> np.ndarray:
    """[n] contig lengths -> int32 [n, genes]: 1 for the contig's genes, 0 for padding."""
    return (np.arange(genes)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


def random_windows(n: int, emb_dim: int, num_pc: int, seed: int = 0, genes: int = GENES, *,
                   min_genes: int | None = None, label_scale: float = 2.0, dtype=np.float32) -> dict:
    """n contig windows of `min_genes` (default genes // 2) to `genes` genes, padded to `genes`:
    inputs_embeds [n, genes, emb_dim] ~ N(0, 1), labels [n, genes, num_pc] ~ N(0, label_scale^2),
    both zero at padding (as make-shards writes them), attention_mask int32 [n, genes]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(genes // 2 if min_genes is None else min_genes, genes + 1, n)
    mask = padding_mask(lengths, genes)
    return {"inputs_embeds": (rng.normal(size=(n, genes, emb_dim)) * mask[..., None]).astype(dtype),
            "labels": (label_scale * rng.normal(size=(n, genes, num_pc)) * mask[..., None]).astype(dtype),
            "attention_mask": mask}


def random_shard_records(n: int, seed: int = 0, dtype=np.float16) -> dict:
    """`random_windows` of SHARD_GENES x SHARD_EMB_DIM (labels SHARD_NUM_PC) with every field
    of a make-shards record (ids, hashes, strands, names, window bookkeeping)."""
    arrays = random_windows(n, SHARD_EMB_DIM, SHARD_NUM_PC, seed, SHARD_GENES, min_genes=3, label_scale=1.0,
                            dtype=dtype)
    mask = arrays["attention_mask"].astype(np.int64)
    lengths = mask.sum(1)
    first = np.cumsum(lengths) - lengths + 1
    rng = np.random.default_rng([seed, 1])
    return arrays | {
        "attention_mask": mask, "prot_ids": np.where(mask, first[:, None] + np.arange(SHARD_GENES), 0),
        "protein_hash": rng.integers(-2 ** 63, 2 ** 63 - 1, (n, SHARD_GENES)) * mask,
        "strand": rng.choice([-1, 1], (n, SHARD_GENES)) * mask,
        "gene_ids": np.where(mask, np.array([[f"g{w}_{j}" for j in range(SHARD_GENES)] for w in range(n)], object), ""),
        "gene_labels": np.where(mask, '{"is_phage":"1"}', "").astype(object),
        "num_genes": lengths, "window_index": np.arange(n), "window_start": rng.integers(0, 100, n),
        "contig_id": np.array([f"contig{w // 4}_{w % 4}" for w in range(n)], object),
        "genome": np.array(["phage.gbk"] * n, object),
    }


def write_shard_dataset(out_dir, arrays: dict, num_shards: int, dtype: str = "float16", split: str = "train") -> list:
    """Writes `random_shard_records` arrays as a make-shards directory; returns the shard stats."""
    from glm_jax.data import shards

    with shards.ShardWriter(out_dir, split, num_shards) as writer:
        for start in range(0, len(arrays["inputs_embeds"]), 7):  # several write() calls
            writer.write({k: v[start:start + 7] for k, v in arrays.items()})
    stats = writer.close()
    shards.write_dataset_info(out_dir, {"emb_dim": SHARD_EMB_DIM, "num_pc": SHARD_NUM_PC, "max_genes": SHARD_GENES,
                                        "dtype": dtype, "splits": {split: {"num_windows": len(arrays["inputs_embeds"]),
                                                                           "shards": stats}}})
    return stats


def padded_batch(config: GLMConfig, lengths=(30, 15, 22, 27), seed: int = 0):
    """Model inputs of contigs of the given lengths padded to `config.max_genes`, ~15% of genes
    masked (rows set to -1, at least gene 3 of each contig), labels clipped to +-10.

    Returns inputs [b, s, emb_dim], attention_mask float32 [b, s], masked bool [b, s], labels [b, s, num_pc].
    """
    rng = np.random.default_rng(seed)
    b, s = len(lengths), config.max_genes
    inputs = rng.normal(size=(b, s, config.emb_dim)).astype(np.float32)
    attention_mask = padding_mask(lengths, s).astype(np.float32)
    inputs *= attention_mask[..., None]
    masked = (rng.random((b, s)) < 0.15) & (attention_mask > 0)
    masked[:, 3] = True
    inputs = np.where(masked[..., None], -1.0, inputs).astype(np.float32)
    labels = np.clip(3 * rng.normal(size=(b, s, config.num_pc)), -10, 10).astype(np.float32) * attention_mask[..., None]
    return inputs, attention_mask, masked, labels


# --- tiny training runs --------------------------------------------------------------------------

def tiny_config(steps: int = 6, mesh=(8, 1, 1), **train_overrides):
    """configs/tiny.py logging every step, no eval, checkpoints every 2 steps."""
    config = repo_config("tiny")
    config.train.num_steps = steps
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def readers(config, seed: int = 0, with_eval: bool = False):
    """Train (and eval) readers over random windows fitting `config.model`."""
    from glm_jax.data import shards

    m = config.model
    train_reader = shards.InMemoryWindows(random_windows(NUM_WINDOWS, m.emb_dim, m.num_pc, seed),
                                          config.train.batch_size, seed=config.train.seed)
    eval_reader = None
    if with_eval:
        eval_reader = shards.InMemoryWindows(random_windows(32, m.emb_dim, m.num_pc, seed + 1),
                                             config.train.batch_size, shuffle=False)
    return train_reader, eval_reader


def run(config, workdir, with_eval: bool = False):
    """Trains `config` on the first prod(mesh) devices with random windows -> trainer.TrainResult."""
    from glm_jax.train import trainer

    devices = jax.devices()[:math.prod((config.mesh.data, config.mesh.fsdp, config.mesh.tensor))]
    train_reader, eval_reader = readers(config, with_eval=with_eval)
    return trainer.train_and_evaluate(config, workdir, train_data=train_reader, eval_data=eval_reader, devices=devices)


def params_numpy(result) -> dict:
    """The parameters of a trainer.TrainResult as nested numpy arrays."""
    return jax.tree.map(np.asarray, jax.device_get(result.state.params))


def start_script(script: str, *args, cache=None) -> subprocess.Popen:
    """`tests/scripts/<script>` in a new process, stdout and stderr merged into `.stdout` (text).

    It inherits XLA_FLAGS (8 fake devices); `cache`: a persistent compilation cache folder, so
    the processes of one test compile the same program once."""
    env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{TESTS_DIR}")
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.Popen([sys.executable, str(SCRIPTS_DIR / script), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# --- proteins ----------------------------------------------------------------------------------

def decode_token_rows(tokens) -> list[str]:
    """Residue strings of the real rows of an ESM2 token batch [rows, length] (the dummy rows
    filling up a batch are all <pad>)."""
    from glm_jax.proteins import esm2

    rows = tokens[tokens[:, 0] == esm2.CLS_ID]
    return ["".join(esm2.ALPHABET[t] for t in row if t not in (esm2.CLS_ID, esm2.EOS_ID, esm2.PAD_ID)) for row in rows]


# --- genomes and analyses ----------------------------------------------------------------------

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def composition_features(proteins) -> np.ndarray:
    """[genes, 21] amino-acid composition + log length: a cheap protein descriptor that stands in
    for ESM2 in tests (real ESM2 on a genome takes minutes on CPU)."""
    out = np.zeros((len(proteins), len(AMINO_ACIDS) + 1), np.float32)
    for i, protein in enumerate(proteins):
        counts = np.array([protein.count(a) for a in AMINO_ACIDS], np.float32)
        out[i, :-1] = counts / max(len(protein), 1)
        out[i, -1] = np.log(len(protein))
    return out


def tiny_glm_config(emb_dim: int, num_layers: int = 2, num_heads: int = 2):
    from glm_jax.model.glm import GLMConfig

    return GLMConfig(emb_dim=emb_dim, hidden_size=16, num_layers=num_layers, num_heads=num_heads,
                     intermediate_size=32, max_position_embeddings=32, num_pc=8, num_pred=3,
                     hidden_dropout=0.0, attention_dropout=0.0)


def tiny_glm(emb_dim: int, num_layers: int = 2, num_heads: int = 2, seed: int = 0):
    """A random (untrained) gLM small enough for any test."""
    from flax import nnx

    from glm_jax.model.glm import GLM

    return GLM(tiny_glm_config(emb_dim, num_layers, num_heads), nnx.Rngs(seed))


def model_tables(genes: "pd.DataFrame", features: np.ndarray, model, window: int = 30, stride: int = 15):
    """The inference contract's tables, computed here from `forward` outputs and the definitions:
    genes + `embedding` (last layer, mean over windows) + `hypotheses`/`probabilities`; pairs with
    `attention` [layers * heads], feature l*H+h = A[l,h][i,i+1] + A[l,h][i+1,i] averaged over the
    windows holding both genes. `features` [genes, D] are the per-gene inputs (orientation appended)."""
    import pandas as pd

    from glm_jax.inference.predict import forward

    genes = genes.sort_values(["contig", "position"], kind="stable").reset_index(drop=True)
    orientation = np.where(genes["strand"].to_numpy() > 0, 0.5, -0.5)[:, None]
    inputs = np.concatenate([features, orientation], 1).astype(np.float32)
    starts = []  # (first row, length) of every window, never crossing a contig
    for _, rows in genes.groupby("contig", sort=False).indices.items():
        first, n = rows[0], len(rows)
        for offset in range(0, max(n - window, 0) + stride, stride):
            length = min(window, n - offset)
            if length >= 2:
                starts.append((first + offset, length))
            if offset + window >= n:
                break
    batch = np.zeros((len(starts), window, inputs.shape[1]), np.float32)
    mask = np.zeros((len(starts), window), np.float32)
    for w, (first, length) in enumerate(starts):
        batch[w, :length], mask[w, :length] = inputs[first:first + length], 1
    out = forward(model, {"inputs_embeds": batch, "attention_mask": mask})
    hidden = np.zeros((len(genes), out["last_hidden_state"].shape[-1]))
    hypotheses = np.zeros((len(genes), int(np.prod(out["predictions"].shape[2:]))))
    probabilities = np.zeros((len(genes), out["probabilities"].shape[-1]))
    seen = np.zeros(len(genes))
    pair_sum, pair_count = {}, {}
    for w, (first, length) in enumerate(starts):
        rows = slice(first, first + length)
        hidden[rows] += out["last_hidden_state"][w, :length]
        hypotheses[rows] += out["predictions"][w, :length].reshape(length, -1)
        probabilities[rows] += out["probabilities"][w, :length]
        seen[rows] += 1
        a = out["attentions"][w]  # [layers, heads, genes, genes]
        for i in range(length - 1):
            value = (a[:, :, i, i + 1] + a[:, :, i + 1, i]).reshape(-1)
            pair_sum[first + i] = pair_sum.get(first + i, 0) + value
            pair_count[first + i] = pair_count.get(first + i, 0) + 1
    ids, contigs, positions = genes["gene_id"].to_numpy(), genes["contig"].to_numpy(), genes["position"].to_numpy()
    pairs = pd.DataFrame({"contig": [contigs[r] for r in pair_sum], "gene_id_a": [ids[r] for r in pair_sum],
                          "gene_id_b": [ids[r + 1] for r in pair_sum], "position_a": [positions[r] for r in pair_sum],
                          "attention": [(pair_sum[r] / pair_count[r]).astype(np.float32) for r in pair_sum]})
    covered = seen > 0
    genes = genes[covered].reset_index(drop=True)
    for name, values in (("embedding", hidden), ("hypotheses", hypotheses), ("probabilities", probabilities)):
        genes[name] = list((values[covered] / seen[covered, None]).astype(np.float32))
    return genes, pairs


def fails(capsys, *argv, code=2):
    """Runs `glm-jax ARGV` in-process; returns its one error line after checking the contract.
    code: the exit status expected (None: any non-zero one)."""
    from glm_jax.cli import main as cli

    status = cli.main([str(a) for a in argv])
    assert status != 0 if code is None else status == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"glm-jax {argv[0]}: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def save_original_checkpoint(config: GLMConfig, directory, seed: int) -> "torch.nn.Module":
    """A random PyTorch reference gLM of `config` saved like the released glm.bin (full state dict,
    duplicate stacks included) with the original's RobertaConfig as config.json; returns the model."""
    import json

    import torch

    from glm_jax.interop import torch_reference

    reference = torch_reference.build_reference(config, seed=seed)
    torch.save(reference.state_dict(), directory / "glm.bin")
    (directory / "config.json").write_text(json.dumps(torch_reference.roberta_config(config).to_dict()))
    return reference


# --- stand-in protein embeddings -----------------------------------------------------------------

class HashEmbeddings:
    """Deterministic float16 'embeddings' of protein sequences (a normal draw seeded by the
    sequence's sha256), anisotropic so a PCA is meaningful: the `embed` argument of make-shards
    without a model. `requested` records what each call was given."""

    def __init__(self, dim: int = 48):
        self.dim, self.requested = dim, []

    def __call__(self, sequences):
        self.requested.append(list(sequences))
        return self

    def get(self, sequences):
        import hashlib

        def one(sequence):
            rng = np.random.default_rng(int.from_bytes(hashlib.sha256(sequence.encode()).digest()[:8], "little"))
            return rng.normal(size=self.dim) * np.linspace(3, 0.2, self.dim) + 1
        return np.array([one(s) for s in sequences], np.float16).reshape(len(sequences), self.dim)
