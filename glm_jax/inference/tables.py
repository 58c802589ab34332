"""`infer`'s files: per-chunk table parts, the manifest, and the final tables assembled from the
parts without holding a whole table.

Resume. Each finished chunk is a set of files in out_dir/parts (the genes part written last,
atomically: a chunk is done iff it exists). out_dir/manifest.json pins what the results depend on
(inputs, model, features, options); a rerun with the same settings skips the finished chunks, a
rerun with other settings is refused. Parts are self-contained (every row carries its gene ids,
contig and genome), so the final tables are assembled by reading one part at a time: genes.parquet
gets one row group per part, pairs.parquet merges neighbouring parts' pair sums.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Sequence

import numpy as np

from glm_jax import files
from glm_jax.inference.options import InferenceInputError
from glm_jax.inference.plan import PlannedWindow

GENES_FILE, PAIRS_FILE, MANIFEST_FILE = "genes.parquet", "pairs.parquet", "manifest.json"
PARTS_DIR, MAPS_DIR, WINDOWS_FILE = "parts", "maps", "windows.parquet"
# 2: pair parts carry their rows' gene ids (assembly needs no plan); format 1 directories are refused
MANIFEST_FORMAT = 2


# --- rows of one chunk -----------------------------------------------------------------------------

def list_array(matrix: np.ndarray):
    """[n, d] -> pyarrow list<float32> column."""
    import pyarrow as pa
    matrix = np.ascontiguousarray(matrix, np.float32).reshape(len(matrix), -1)
    offsets = np.arange(len(matrix) + 1, dtype=np.int32) * matrix.shape[1]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.reshape(-1)))


def gene_rows(windows: Sequence[PlannedWindow], wi: np.ndarray, pj: np.ndarray, label_keys: Sequence[str],
              vectors: dict[str, np.ndarray]):
    """The genes table of a chunk: one row per (window wi[r], position pj[r]), metadata then the
    `vectors` ([rows, d] each) as list<float32> columns in their order."""
    import pyarrow as pa
    rows = [(windows[i], windows[i].start + j) for i, j in zip(wi, pj)]
    genes = [w.contig.contig.genes[p] for w, p in rows]
    labels = [g.label_dict for g in genes]
    columns = {
        "gene_id": pa.array([w.contig.gene_ids[p] for w, p in rows], pa.string()),
        "genome": pa.array([w.contig.contig.source for w, _ in rows], pa.string()),
        "contig": pa.array([w.contig.contig.id for w, _ in rows], pa.string()),
        "position": pa.array([p for _, p in rows], pa.int32()),
        "start": pa.array([g.start for g in genes], pa.int64()),
        "end": pa.array([g.end for g in genes], pa.int64()),
        "strand": pa.array([g.strand for g in genes], pa.int8()),
        # 1-based CDS ordinal in its file, pseudo CDS counted: the row key of tables such as
        # gLM's operon.annot (locus tags repeat for alternative starts); null for shards input
        "cds_index": pa.array([g.index or None for g in genes], pa.int64()),
        "window_start": pa.array([w.start for w, _ in rows], pa.int32()),
    }
    for key in label_keys:
        columns[key] = pa.array([d.get(key) for d in labels], pa.string())
    for name, matrix in vectors.items():
        columns[name] = list_array(matrix)
    return pa.table(columns)


PAIR_META = ("contig", "genome", "gene_id_a", "gene_id_b", "position_a")


def pair_sums(windows: Sequence[PlannedWindow], pairs: np.ndarray):
    """Sums and counts of the pair features ([windows, S - 1, F]) of every adjacent real-gene pair
    in the windows, keyed by the run-wide index of the pair's first gene (sorted), with the
    pair's contig, genome, gene ids and position; None when the windows hold no pair."""
    import pyarrow as pa
    keys, values, meta = [], [], {name: [] for name in PAIR_META}
    for i, w in enumerate(windows):
        if w.size > 1:
            keys.append(w.global_start + np.arange(w.size - 1))
            values.append(pairs[i, :w.size - 1])
            positions = range(w.start, w.start + w.size - 1)
            meta["contig"] += [w.contig.contig.id] * (w.size - 1)
            meta["genome"] += [w.contig.contig.source] * (w.size - 1)
            meta["gene_id_a"] += [w.contig.gene_ids[p] for p in positions]
            meta["gene_id_b"] += [w.contig.gene_ids[p + 1] for p in positions]
            meta["position_a"] += list(positions)
    if not keys:
        return None
    keys, values = np.concatenate(keys), np.concatenate(values).astype(np.float64)
    unique, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    sums = np.zeros((len(unique), values.shape[1]))
    np.add.at(sums, inverse, values)
    return pa.table({"key": pa.array(unique, pa.int64()), "count": pa.array(counts, pa.int32()),
                     "sum": list_array(sums),
                     **{name: np.asarray(column, np.int32 if name == "position_a" else object)[first]
                        for name, column in meta.items()}})


def window_rows(first_window: int, windows: Sequence[PlannedWindow]):
    """The attention-map index of a chunk (before its `file` column)."""
    import pyarrow as pa
    return pa.table({
        "window": pa.array(np.arange(first_window, first_window + len(windows)), pa.int64()),
        "row": pa.array(np.arange(len(windows)), pa.int32()),
        "genome": [w.contig.contig.source for w in windows],
        "contig": [w.contig.contig.id for w in windows],
        "start": pa.array([w.start for w in windows], pa.int32()),
        "num_genes": pa.array([w.size for w in windows], pa.int32()),
        "gene_ids": [list(w.contig.gene_ids[w.start:w.start + w.size]) for w in windows]})


# --- parts -----------------------------------------------------------------------------------------

def write_table(path: pathlib.Path, table) -> None:
    import pyarrow.parquet as pq
    files.atomic_write(path, lambda handle: pq.write_table(table, handle))


def part(out_dir: pathlib.Path, kind: str, chunk: int) -> pathlib.Path:
    return out_dir / PARTS_DIR / f"{kind}-{chunk:05d}.parquet"


def map_file(out_dir: pathlib.Path, chunk: int) -> pathlib.Path:
    return out_dir / MAPS_DIR / f"attention-{chunk:05d}.npy"


def chunk_done(out_dir: pathlib.Path, chunk: int) -> bool:
    return part(out_dir, "genes", chunk).is_file()


def write_chunk(out_dir: pathlib.Path, chunk: int, result: dict) -> None:
    """The chunk's files; the genes part last, so its presence means the chunk is complete."""
    if result.get("pairs") is not None:
        write_table(part(out_dir, "pairs", chunk), result["pairs"])
    if "maps" in result:
        path = map_file(out_dir, chunk)
        files.atomic_write(path, lambda handle: np.save(handle, result["maps"]))
        windows = result["windows"]
        write_table(part(out_dir, "windows", chunk), windows.add_column(1, "file", [[path.name] * len(windows)]))
    write_table(part(out_dir, "genes", chunk), result["genes"])


def remove_parts(out_dir: pathlib.Path) -> None:
    """The parts folder (and a killed writer's temporary files in maps/) once the tables are final."""
    folder = out_dir / PARTS_DIR
    for path in list(folder.iterdir()) if folder.is_dir() else []:
        path.unlink()
    if folder.is_dir():
        folder.rmdir()
    for stale in (out_dir / MAPS_DIR).glob(".*.tmp"):
        stale.unlink()


# --- the final tables ---------------------------------------------------------------------------------

def concatenate_parts(parts: list[pathlib.Path], path: pathlib.Path) -> None:
    """Parts -> one parquet file, one row group per part (never all in memory)."""
    import pyarrow.parquet as pq

    def write(handle):
        writer = None
        for part_path in parts:
            table = pq.read_table(part_path)
            writer = writer or pq.ParquetWriter(handle, table.schema)
            writer.write_table(table)
        writer.close()

    files.atomic_write(path, write)


def assemble_pairs(out_dir: pathlib.Path, chunk_starts: np.ndarray, path: pathlib.Path) -> int:
    """Merges the chunks' pair sums into averages, one part at a time: a pair whose first gene lies
    before the next chunk's first window can appear in no later chunk, so it is final then.
    chunk_starts [chunks]: run-wide index of each chunk's first window's first gene. -> rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([("contig", pa.string()), ("genome", pa.string()), ("gene_id_a", pa.string()),
                        ("gene_id_b", pa.string()), ("position_a", pa.int32()), ("attention", pa.list_(pa.float32())),
                        ("num_windows", pa.int32())])
    rows = 0

    def write(handle):
        nonlocal rows
        writer = pq.ParquetWriter(handle, schema)
        keys, counts, sums = np.zeros(0, np.int64), np.zeros(0, np.int64), None
        meta = {name: np.zeros(0, object) for name in PAIR_META}
        for n in range(len(chunk_starts)):
            part_path = part(out_dir, "pairs", n)
            if part_path.is_file():
                table = pq.read_table(part_path)
                new_sums = np.stack(table["sum"].to_numpy(zero_copy_only=False))
                keys = np.concatenate([keys, table["key"].to_numpy()])
                counts = np.concatenate([counts, table["count"].to_numpy()])
                sums = new_sums if sums is None else np.concatenate([sums, new_sums])
                meta = {name: np.concatenate([meta[name], table[name].to_numpy(zero_copy_only=False)])
                        for name in PAIR_META}
                keys, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
                merged = np.zeros((len(keys), sums.shape[1]))
                np.add.at(merged, inverse, sums)
                counts = np.bincount(inverse, weights=counts).astype(np.int64)
                sums, meta = merged, {name: column[first] for name, column in meta.items()}
            following = chunk_starts[n + 1] if n + 1 < len(chunk_starts) else np.inf
            final = keys < following
            if final.any():
                writer.write_table(pa.table({
                    "contig": meta["contig"][final], "genome": meta["genome"][final],
                    "gene_id_a": meta["gene_id_a"][final], "gene_id_b": meta["gene_id_b"][final],
                    "position_a": pa.array(meta["position_a"][final].astype(np.int32), pa.int32()),
                    "attention": list_array(sums[final] / counts[final][:, None]),
                    "num_windows": pa.array(counts[final], pa.int32())}, schema=schema))
                rows += int(final.sum())
                keys, sums, counts = keys[~final], sums[~final], counts[~final]
                meta = {name: column[~final] for name, column in meta.items()}
        writer.close()

    files.atomic_write(path, write)
    return rows


def read_gene_table(output_dir: str | pathlib.Path):
    """genes.parquet of an `infer_genomes` output as a pandas DataFrame (list columns hold numpy
    arrays; `np.stack(table["embedding"])` gives [genes, hidden])."""
    import pandas as pd
    path = pathlib.Path(output_dir) / GENES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `glm-jax infer` into {output_dir} (or let it finish)")
    return pd.read_parquet(path)


def read_pair_table(output_dir: str | pathlib.Path):
    """pairs.parquet (attention="pairs") as a pandas DataFrame."""
    import pandas as pd
    path = pathlib.Path(output_dir) / PAIRS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `glm-jax infer --attention pairs` into {output_dir}")
    return pd.read_parquet(path)


# --- the manifest ---------------------------------------------------------------------------------------

def file_digest(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model) -> str:
    """sha256 of the config and of every parameter's sum and sum of squares (cheap at any size)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        leaf = jnp.asarray(leaf, jnp.float32)
        digest.update(np.asarray([jnp.sum(leaf), jnp.sum(leaf * leaf)], np.float64).tobytes())
    return digest.hexdigest()


def transform_fingerprint(transform) -> str:
    digest = hashlib.sha256()
    for array in (transform.mean, transform.std, transform.pca_mean, transform.pca_components,
                  transform.pca_explained_variance):
        digest.update(np.ascontiguousarray(array, np.float64).tobytes())
    return digest.hexdigest()


def open_manifest(out_dir: pathlib.Path, identity: dict, create: bool = True) -> dict:
    """The run's manifest: an existing one of the same identity (else an error), or a new one
    (written when `create`: one process of a distributed run writes it)."""
    path = out_dir / MANIFEST_FILE
    if path.is_file():
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise InferenceInputError(f"{path}: written by another version of `glm-jax infer` (format "
                                      f"{manifest.get('format')}, now {MANIFEST_FORMAT}); use another output "
                                      f"directory or delete it")
        saved = manifest.get("identity", {})
        differ = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        if differ:
            raise InferenceInputError(f"{out_dir} holds results of another run (differs in {', '.join(differ)}); "
                                      f"use another output directory or delete it")
        return manifest
    manifest = {"format": MANIFEST_FORMAT, "identity": identity, "complete": False, "runs": []}
    if create:
        save_manifest(out_dir, manifest)
    return manifest


def save_manifest(out_dir: pathlib.Path, manifest: dict) -> None:
    files.write_text_atomic(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1))


def run_record_file(out_dir: pathlib.Path, process: int) -> pathlib.Path:
    """What process `process` computed in this run, for the primary to add to the manifest."""
    return out_dir / PARTS_DIR / f"run-{process:05d}.json"


def save_record(path: pathlib.Path, record: dict) -> None:
    files.write_text_atomic(path, json.dumps(record))
