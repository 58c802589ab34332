"""`glm-jax infer`: genomes (or make-shards output) -> per-gene gLM results in parquet tables.

    infer_genomes([...], checkpoint, out_dir)  ->  out_dir/genes.parquet  (+ pairs.parquet, maps/)
    read_gene_table(out_dir)                   ->  pandas.DataFrame, one row per gene

Steps: read the genomes with the make-shards readers (glm_jax.data.genomes) -> embed each distinct
protein once in the resumable ESM2 store (glm_jax.proteins.embed) -> the checkpoint's training
features (glm_jax.data.features: the normalisation/PCA of its make-shards directory) -> windows
that cover EVERY gene -> the model, data-parallel over all local devices -> chunk files -> tables.

Window rule. Each contig is cut into windows of `window` genes starting every `stride` genes
(default window // 2), the last window ending at the contig's last gene; a contig shorter than a
window is one padded window; no gene is ever dropped and no window crosses a contig. Each gene's
row comes from ONE window: the one in which it sits most central (nearest the window's middle;
ties -> the earlier window). So every value of a row (embedding, layers, hypotheses with their
probabilities) is one real forward pass, equal to `forward` on that window, and each gene away
from the contig ends has at least (window - stride) // 2 genes of context on either side, the
most this stride allows. Averaging a gene over windows would instead mix hidden states of
different contexts into a vector that no forward pass produces, and would unpair hypotheses from
their probabilities. Pair features (attention="pairs") follow the original operon feature and are
averaged over all windows that hold both genes (`num_windows` says how many).

Resume. Windows are grouped into chunks of `chunk_windows`; each finished chunk is a set of files
in out_dir/parts (the genes part written last, atomically: a chunk is done iff it exists).
out_dir/manifest.json pins what the results depend on (inputs, model, features, options); a rerun
with the same settings skips the finished chunks, a rerun with other settings is refused. The
final tables are assembled part by part (one parquet row group each, so memory stays flat),
written atomically, and the parts are deleted.

Attention maps (attention="maps"): out_dir/maps/attention-NNNNN.npy, float32
[windows_in_chunk, layers, heads, window, window] per chunk (padded positions included: slice
[:n, :n]), indexed by out_dir/maps/windows.parquet (window, file, row, contig, start, num_genes,
gene_ids). Plain .npy because np.load(mmap_mode="r") reads one window without loading the file,
the layout is the model's, and it needs no library beyond numpy; one file per chunk keeps resume
identical to the tables'.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax import files, sharding
from glm_jax.data import features, genomes
from glm_jax.errors import InputError
from glm_jax.model import objective
from glm_jax.model.glm import GLM

GENES_FILE, PAIRS_FILE, MANIFEST_FILE = "genes.parquet", "pairs.parquet", "manifest.json"
PARTS_DIR, MAPS_DIR, WINDOWS_FILE = "parts", "maps", "windows.parquet"
ATTENTION_MODES = (None, "pairs", "maps")
MANIFEST_FORMAT = 1


class InferenceInputError(InputError):
    """Inputs that cannot be run (no genes, mismatched model/features); names the file or field."""


# --- options and plan -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """What the outputs depend on besides inputs, model and features (all in the manifest)."""
    window: int = 30
    stride: int | None = None
    layers: tuple[int, ...] = ()
    hypotheses: bool = False
    context_only: bool = False
    attention: str | None = None
    include_esm2: bool = False
    attention_impl: str = "reference"
    chunk_windows: int = 256

    @property
    def step(self) -> int:
        return self.stride if self.stride is not None else max(1, self.window // 2)

    def check(self, num_layers: int, max_positions: int, clip_distances: bool = False) -> None:
        from glm_jax import kernels
        if not 1 <= self.step <= self.window:
            raise InferenceInputError(f"need 1 <= stride <= window, got window {self.window}, stride {self.stride}")
        if self.window > max_positions and not clip_distances:
            raise InferenceInputError(f"window {self.window} exceeds the checkpoint's max_position_embeddings "
                                      f"{max_positions} (--clip-distances lifts the limit)")
        if self.attention not in ATTENTION_MODES:
            raise InferenceInputError(f"attention must be one of pairs, maps or None, got {self.attention!r}")
        if self.attention is not None and not kernels.returns_probs(self.attention_impl):
            raise InferenceInputError(f"--attention {self.attention} needs attention maps, which attention "
                                      f"implementation {self.attention_impl!r} does not keep; use reference or "
                                      "xla_shifted")
        bad = [layer for layer in self.layers if not 0 <= layer <= num_layers]
        if bad:
            raise InferenceInputError(f"layers {bad} outside 0..{num_layers} (0: the embedding output, "
                                      f"{num_layers}: the last layer)")
        if self.chunk_windows < 1:
            raise InferenceInputError(f"chunk_windows must be >= 1, got {self.chunk_windows}")


@dataclasses.dataclass(frozen=True)
class PlannedWindow:
    """Genes [start, start + size) of contig `contig`; `owned` [size] bool marks the genes whose
    row this window gives (where they are most central). `record` indexes a shard window."""
    contig: int
    start: int
    size: int
    owned: np.ndarray
    record: int = -1


@dataclasses.dataclass
class Plan:
    contigs: list[genomes.Contig]
    gene_ids: list[list[str]]     # per contig, unique over the whole run
    windows: list[PlannedWindow]  # in (contig, start) order
    offsets: np.ndarray           # [contigs + 1] global index of each contig's first gene
    label_keys: list[str]         # label qualifier columns, in genomes.LABEL_QUALIFIERS order

    def global_index(self, w: PlannedWindow) -> int:
        return int(self.offsets[w.contig]) + w.start

    def chunks(self, size: int) -> list[range]:
        return [range(i, min(i + size, len(self.windows))) for i in range(0, len(self.windows), size)]


def window_bounds(num_genes: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[start, stop) of every window of a contig: starts 0, stride, ... up to the first window that
    reaches the last gene (whose start is pulled back so it is full when the contig allows)."""
    if num_genes <= window:
        return [(0, num_genes)]
    bounds, start = [], 0
    while True:
        if start + window >= num_genes:
            bounds.append((num_genes - window, num_genes))
            return bounds
        bounds.append((start, start + window))
        start += stride


def owners(bounds: Sequence[tuple[int, int]], positions: int) -> np.ndarray:
    """[positions] index of the window in which each position is most central (-1: in none);
    ties go to the earlier window."""
    best = np.full(positions, np.inf)
    owner = np.full(positions, -1)
    for k, (start, stop) in enumerate(bounds):
        p = np.arange(start, stop)
        distance = np.abs(p - (start + stop - 1) / 2)
        better = distance < best[p]
        best[p[better]], owner[p[better]] = distance[better], k
    return owner


def _unique_ids(contigs: Sequence[genomes.Contig]) -> list[list[str]]:
    """Gene ids, a repeated id suffixed `#2`, `#3`, ... in input order (the first keeps its id)."""
    seen: dict[str, int] = {}
    out = []
    for contig in contigs:
        ids = []
        for gene in contig.genes:
            if gene is None:
                ids.append("")
                continue
            seen[gene.id] = seen.get(gene.id, 0) + 1
            ids.append(gene.id if seen[gene.id] == 1 else f"{gene.id}#{seen[gene.id]}")
        out.append(ids)
    return out


def _label_keys(contigs: Sequence[genomes.Contig]) -> list[str]:
    present = {key for c in contigs for g in c.genes if g is not None for key, _ in g.labels}
    return [k for k in genomes.LABEL_QUALIFIERS if k in present] + sorted(present - set(genomes.LABEL_QUALIFIERS))


def plan_windows(contigs: Sequence[genomes.Contig], window: int, stride: int) -> Plan:
    """Covering windows of every contig (see the module docstring)."""
    windows = []
    for c, contig in enumerate(contigs):
        bounds = window_bounds(len(contig.genes), window, stride)
        owner = owners(bounds, len(contig.genes))
        windows += [PlannedWindow(c, a, b - a, owner[a:b] == k) for k, (a, b) in enumerate(bounds)]
    return _plan(list(contigs), windows)


def _plan(contigs: list[genomes.Contig], windows: list[PlannedWindow]) -> Plan:
    offsets = np.concatenate([[0], np.cumsum([len(c.genes) for c in contigs])]).astype(np.int64)
    return Plan(contigs, _unique_ids(contigs), windows, offsets, _label_keys(contigs))


def read_corpus(genome_paths: Sequence[str | pathlib.Path], contig_table=None) -> genomes.GenomeRead:
    """Every file read (contigs without genes left out, skipped CDS kept for the log); a file
    without a single protein-coding gene is an error."""
    corpus = genomes.GenomeRead()
    for path in genome_paths:
        read = genomes.read_genome(path, contig_table=contig_table)
        if read.num_genes == 0:
            skipped = f" ({len(read.skipped)} CDS skipped: {read.summary()['skipped_by_reason']})" if read.skipped else ""
            raise InferenceInputError(f"{path}: no CDS with a protein sequence{skipped}; nothing to infer")
        read.contigs = [c for c in read.contigs if c.genes]
        corpus.extend(read)
    return corpus


# --- features of windows ----------------------------------------------------------------------

class GenomeFeatures:
    """Model inputs of planned windows from the embedding store and the feature transform.

    Features are rounded to `dtype` (float16 unless the training shards say otherwise) before the
    model, as make-shards stores them, so a window gives what training and `embed` saw."""

    def __init__(self, plan: Plan, store, transform: features.FeatureTransform, window: int, dtype: str = "float16"):
        self.plan, self.store, self.transform, self.window, self.dtype = plan, store, transform, window, np.dtype(dtype)

    def __call__(self, windows: Sequence[PlannedWindow]) -> dict[str, np.ndarray]:
        """-> inputs_embeds [n, S, E] float32, labels [n, S, K] float32, attention_mask [n, S] int32,
        esm2 [n, S, D] float32 (the raw embeddings, pad rows 0)."""
        genes = [self.plan.contigs[w.contig].genes[w.start:w.start + w.size] for w in windows]
        proteins = list(dict.fromkeys(g.protein for window in genes for g in window))
        row_of = {p: i for i, p in enumerate(proteins)}
        rows = np.full((len(windows), self.window), -1, np.int64)
        strands = np.zeros((len(windows), self.window), np.int64)
        for i, window in enumerate(genes):
            rows[i, :len(window)] = [row_of[g.protein] for g in window]
            strands[i, :len(window)] = [g.strand for g in window]
        embeddings = self.store.get(proteins)
        arrays = features.window_arrays(self.transform, embeddings, rows, strands, dtype=self.dtype)
        esm = np.where((rows >= 0)[..., None], embeddings[np.maximum(rows, 0)].astype(np.float32), 0.0)
        return {"inputs_embeds": arrays["inputs_embeds"].astype(np.float32),
                "labels": arrays["labels"].astype(np.float32),
                "attention_mask": arrays["attention_mask"].astype(np.int32), "esm2": esm}


class ShardFeatures:
    """Model inputs of windows read from make-shards output (already featurised)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __call__(self, windows: Sequence[PlannedWindow]) -> dict[str, np.ndarray]:
        rows = np.array([w.record for w in windows])
        return {"inputs_embeds": self.arrays["inputs_embeds"][rows].astype(np.float32),
                "labels": self.arrays["labels"][rows].astype(np.float32),
                "attention_mask": self.arrays["attention_mask"][rows].astype(np.int32)}


def plan_from_shards(dataset_dir: str | pathlib.Path) -> tuple[Plan, ShardFeatures]:
    """Every window of a make-shards directory (all splits) as a plan; contigs are rebuilt from
    the windows' `<contig>_<segment>` names and offsets. Genes in no window (segments make-shards
    dropped as too short) have no row; overlapping windows (--stride) use the most-central rule."""
    from glm_jax.data import shards
    info = shards.load_dataset_info(dataset_dir)
    parts = [shards.read_shards(dataset_dir, split=split) for split in info["splits"]]
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keys = [(g.decode(), c.decode().rsplit("_", 1)[0]) for g, c in zip(arrays["genome"], arrays["contig_id"])]
    order = sorted(range(len(keys)), key=lambda i: (keys[i], int(arrays["window_start"][i])))
    contig_index: dict[tuple[str, str], int] = {}
    gene_slots: list[dict[int, genomes.Gene]] = []
    entries = []
    for i in order:
        c = contig_index.setdefault(keys[i], len(contig_index))
        if c == len(gene_slots):
            gene_slots.append({})
        start, size = int(arrays["window_start"][i]), int(arrays["attention_mask"][i].sum())
        for j in range(size):
            labels = arrays["gene_labels"][i, j]
            gene_slots[c][start + j] = genomes.Gene(
                arrays["gene_ids"][i, j].decode(), "", int(arrays["strand"][i, j]), None, None, keys[i][1],
                labels=tuple(sorted(json.loads(labels).items())) if labels else ())
        entries.append((c, start, size, i))
    contigs = [genomes.Contig(contig, source, tuple(slots.get(p) for p in range(max(slots) + 1)))
               for (source, contig), slots in zip(contig_index, gene_slots)]
    windows = []
    for c in range(len(contigs)):
        mine = [e for e in entries if e[0] == c]
        owner = owners([(s, s + n) for _, s, n, _ in mine], len(contigs[c].genes))
        windows += [PlannedWindow(c, s, n, owner[s:s + n] == k, record) for k, (_, s, n, record) in enumerate(mine)]
    return _plan(contigs, windows), ShardFeatures(arrays)


# --- the model, data-parallel over local devices ----------------------------------------------

def _window_outputs(graphdef, state, inputs, mask, *, layers, hypotheses, attention):
    """Per-window outputs. inputs [B, S, E], mask [B, S] ->
    embedding [B, S, H], layers [B, len(layers), S, H], hypotheses [B, S, P * C], probabilities
    [B, S, P], pairs [B, S - 1, L * heads] (A[i, i+1] + A[i+1, i]), maps [B, L, heads, S, S]."""
    model = nnx.merge(graphdef, state)
    out = model(inputs, mask, output_hidden_states=bool(layers), output_attentions=attention is not None)
    result = {"embedding": out.last_hidden_state.astype(jnp.float32)}
    if layers:
        result["layers"] = out.hidden_states[:, jnp.array(layers)].astype(jnp.float32)
    if hypotheses:
        result["hypotheses"] = out.predictions.reshape(*out.predictions.shape[:2], -1)
        result["probabilities"] = jax.nn.softmax(out.logits, axis=-1)
    if attention == "pairs":
        a = out.attentions  # [B, L, heads, S, S]
        i = jnp.arange(a.shape[-1] - 1)
        pair = a[..., i, i + 1] + a[..., i + 1, i]  # [B, L, heads, S - 1]
        result["pairs"] = pair.reshape(a.shape[0], -1, a.shape[-1] - 1).swapaxes(1, 2)
    elif attention == "maps":
        result["maps"] = out.attentions
    return result


def _masked_outputs(graphdef, state, inputs, mask, positions, *, hypotheses):
    """Each row's gene at `positions` [B] replaced by the mask row (-1, the training mask) ->
    context_embedding [B, H] (+ context_hypotheses [B, P * C], context_probabilities [B, P])."""
    model = nnx.merge(graphdef, state)
    masked = jnp.arange(inputs.shape[1])[None] == positions[:, None]
    out = model(objective.apply_gene_mask(inputs, masked), mask)
    rows = jnp.arange(inputs.shape[0])
    result = {"context_embedding": out.last_hidden_state[rows, positions].astype(jnp.float32)}
    if hypotheses:
        result["context_hypotheses"] = out.predictions[rows, positions].reshape(inputs.shape[0], -1)
        result["context_probabilities"] = jax.nn.softmax(out.logits[rows, positions], axis=-1)
    return result


class ModelRunner:
    """Fixed-shape batches on a 1-D data-parallel mesh over `devices`; parameters replicated."""

    def __init__(self, model: GLM, devices: Sequence[jax.Device], batch_size: int, options: InferenceOptions):
        self.mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, list(devices))
        self.batch_size = -(-batch_size // len(devices)) * len(devices)  # a multiple of the devices
        graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, sharding.replicated(self.mesh))
        self.input_sharding = sharding.batch_sharding(self.mesh)
        self._windows = jax.jit(functools.partial(_window_outputs, graphdef, layers=tuple(options.layers),
                                                  hypotheses=options.hypotheses, attention=options.attention))
        self._masked = jax.jit(functools.partial(_masked_outputs, graphdef, hypotheses=options.hypotheses))
        self.calls = 0  # model calls (batches) made: what a resumed run must not repeat

    def _run(self, fn, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        n = len(arrays[0])
        pieces = []
        with sharding.use_mesh(self.mesh):
            for start in range(0, max(n, 1), self.batch_size):  # n = 0: one padded call gives the shapes
                batch = [_pad_rows(a[start:start + self.batch_size], self.batch_size) for a in arrays]
                batch = [jax.device_put(a, self.input_sharding) for a in batch]
                out = jax.device_get(fn(self.state, *batch))
                self.calls += 1
                pieces.append({k: v[:max(0, min(self.batch_size, n - start))] for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}

    def windows(self, inputs: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(self._windows, [inputs, mask])

    def masked(self, inputs: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(self._masked, [inputs, mask, positions.astype(np.int32)])


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """Zero rows appended up to `rows` (all-padding windows; their outputs are dropped)."""
    if len(array) == rows:
        return array
    return np.concatenate([array, np.zeros((rows - len(array),) + array.shape[1:], array.dtype)])


# --- one chunk --------------------------------------------------------------------------------

def _list_array(matrix: np.ndarray):
    """[n, d] -> pyarrow list<float32> column."""
    import pyarrow as pa
    matrix = np.ascontiguousarray(matrix, np.float32).reshape(len(matrix), -1)
    offsets = np.arange(len(matrix) + 1, dtype=np.int32) * matrix.shape[1]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.reshape(-1)))


def compute_chunk(plan: Plan, window_ids: range, featurize: Callable, runner: ModelRunner,
                  options: InferenceOptions) -> dict:
    """Runs the model on the chunk's windows -> {"genes": table, "pairs": table?, "maps": array?,
    "windows": table?} (pyarrow tables, rows in global gene / pair order)."""
    import pyarrow as pa
    windows = [plan.windows[k] for k in window_ids]
    arrays = featurize(windows)
    out = runner.windows(arrays["inputs_embeds"], arrays["attention_mask"])
    # rows of owned genes: (window in chunk, position in window)
    owned = [(i, j) for i, w in enumerate(windows) for j in np.flatnonzero(w.owned)]
    wi = np.array([i for i, _ in owned], np.int64)
    pj = np.array([j for _, j in owned], np.int64)
    columns = _gene_metadata(plan, windows, wi, pj)
    columns["embedding"] = _list_array(out["embedding"][wi, pj])
    for k, layer in enumerate(options.layers):
        columns[f"layer_{layer}"] = _list_array(out["layers"][wi, k, pj])
    if options.hypotheses:
        columns["hypotheses"] = _list_array(out["hypotheses"][wi, pj])
        columns["probabilities"] = _list_array(out["probabilities"][wi, pj])
        columns["label_embedding"] = _list_array(arrays["labels"][wi, pj])
    if options.context_only:
        masked = runner.masked(arrays["inputs_embeds"][wi], arrays["attention_mask"][wi], pj)
        for key, value in masked.items():
            columns[key] = _list_array(value)
    if options.include_esm2:
        columns["esm2"] = _list_array(arrays["esm2"][wi, pj])
    result = {"genes": pa.table(columns)}
    if options.attention == "pairs":
        result["pairs"] = _pair_sums(plan, windows, out["pairs"])
    elif options.attention == "maps":
        result["maps"] = out["maps"]
        result["windows"] = pa.table({
            "window": pa.array(list(window_ids), pa.int64()),
            "row": pa.array(np.arange(len(windows)), pa.int32()),
            "genome": [plan.contigs[w.contig].source for w in windows],
            "contig": [plan.contigs[w.contig].id for w in windows],
            "start": pa.array([w.start for w in windows], pa.int32()),
            "num_genes": pa.array([w.size for w in windows], pa.int32()),
            "gene_ids": [plan.gene_ids[w.contig][w.start:w.start + w.size] for w in windows]})
    return result


def _gene_metadata(plan: Plan, windows: list[PlannedWindow], wi: np.ndarray, pj: np.ndarray) -> dict:
    import pyarrow as pa
    rows = [(windows[i].contig, windows[i].start + j, windows[i]) for i, j in zip(wi, pj)]
    genes = [plan.contigs[c].genes[p] for c, p, _ in rows]
    labels = [g.label_dict for g in genes]
    columns = {
        "gene_id": pa.array([plan.gene_ids[c][p] for c, p, _ in rows], pa.string()),
        "genome": pa.array([plan.contigs[c].source for c, _, _ in rows], pa.string()),
        "contig": pa.array([plan.contigs[c].id for c, _, _ in rows], pa.string()),
        "position": pa.array([p for _, p, _ in rows], pa.int32()),
        "start": pa.array([g.start for g in genes], pa.int64()),
        "end": pa.array([g.end for g in genes], pa.int64()),
        "strand": pa.array([g.strand for g in genes], pa.int8()),
        # 1-based CDS ordinal in its file, pseudo CDS counted: the row key of tables such as
        # gLM's operon.annot (locus tags repeat for alternative starts); null for shards input
        "cds_index": pa.array([g.index or None for g in genes], pa.int64()),
        "window_start": pa.array([w.start for _, _, w in rows], pa.int32()),
    }
    for key in plan.label_keys:
        columns[key] = pa.array([d.get(key) for d in labels], pa.string())
    return columns


def _pair_sums(plan: Plan, windows: list[PlannedWindow], pairs: np.ndarray):
    """Sums and counts of the pair features of every adjacent real-gene pair in the windows,
    keyed by the global index of the pair's first gene (sorted)."""
    import pyarrow as pa
    keys, values = [], []
    for i, w in enumerate(windows):
        if w.size > 1:
            keys.append(plan.global_index(w) + np.arange(w.size - 1))
            values.append(pairs[i, :w.size - 1])
    if not keys:
        return None
    keys, values = np.concatenate(keys), np.concatenate(values).astype(np.float64)
    unique, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    sums = np.zeros((len(unique), values.shape[1]))
    np.add.at(sums, inverse, values)
    return pa.table({"key": pa.array(unique, pa.int64()), "count": pa.array(counts, pa.int32()),
                     "sum": _list_array(sums)})


# --- files ------------------------------------------------------------------------------------

def _write_table(path: pathlib.Path, table) -> None:
    import pyarrow.parquet as pq
    files.atomic_write(path, lambda handle: pq.write_table(table, handle))


def _part(out_dir: pathlib.Path, kind: str, chunk: int) -> pathlib.Path:
    return out_dir / PARTS_DIR / f"{kind}-{chunk:05d}.parquet"


def _map_file(out_dir: pathlib.Path, chunk: int) -> pathlib.Path:
    return out_dir / MAPS_DIR / f"attention-{chunk:05d}.npy"


def write_chunk(out_dir: pathlib.Path, chunk: int, result: dict) -> None:
    """The chunk's files; the genes part last, so its presence means the chunk is complete."""
    if result.get("pairs") is not None:
        _write_table(_part(out_dir, "pairs", chunk), result["pairs"])
    if "maps" in result:
        path = _map_file(out_dir, chunk)
        files.atomic_write(path, lambda handle: np.save(handle, result["maps"]))
        windows = result["windows"]
        _write_table(_part(out_dir, "windows", chunk), windows.add_column(1, "file", [[path.name] * len(windows)]))
    _write_table(_part(out_dir, "genes", chunk), result["genes"])


def _concatenate_parts(parts: list[pathlib.Path], path: pathlib.Path) -> None:
    """Parts -> one parquet file, one row group per part (never all in memory)."""
    import pyarrow.parquet as pq

    def write(handle):
        writer = None
        for part in parts:
            table = pq.read_table(part)
            writer = writer or pq.ParquetWriter(handle, table.schema)
            writer.write_table(table)
        writer.close()

    files.atomic_write(path, write)


def _assemble_pairs(plan: Plan, chunks: list[range], out_dir: pathlib.Path, path: pathlib.Path) -> int:
    """Merges the chunks' pair sums into averages, streaming: a pair whose first gene lies before
    the next chunk's first window can appear in no later chunk, so it is final. Returns rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    contig_of = np.searchsorted(plan.offsets, np.arange(plan.offsets[-1]), side="right") - 1
    schema = pa.schema([("contig", pa.string()), ("genome", pa.string()), ("gene_id_a", pa.string()),
                        ("gene_id_b", pa.string()), ("position_a", pa.int32()), ("attention", pa.list_(pa.float32())),
                        ("num_windows", pa.int32())])
    rows = 0

    def rows_of(keys, sums, counts):
        contigs = contig_of[keys]
        positions = keys - plan.offsets[contigs]
        return pa.table({
            "contig": [plan.contigs[c].id for c in contigs], "genome": [plan.contigs[c].source for c in contigs],
            "gene_id_a": [plan.gene_ids[c][p] for c, p in zip(contigs, positions)],
            "gene_id_b": [plan.gene_ids[c][p + 1] for c, p in zip(contigs, positions)],
            "position_a": pa.array(positions, pa.int32()), "attention": _list_array(sums / counts[:, None]),
            "num_windows": pa.array(counts, pa.int32())}, schema=schema)

    def write(handle):
        nonlocal rows
        writer = pq.ParquetWriter(handle, schema)
        keys = np.zeros(0, np.int64)
        sums, counts = None, np.zeros(0, np.int64)
        for n, chunk in enumerate(chunks):
            part = _part(out_dir, "pairs", n)
            if part.is_file():
                table = pq.read_table(part)
                new_sums = np.stack(table["sum"].to_numpy(zero_copy_only=False))
                keys = np.concatenate([keys, table["key"].to_numpy()])
                counts = np.concatenate([counts, table["count"].to_numpy()])
                sums = new_sums if sums is None else np.concatenate([sums, new_sums])
                keys, inverse = np.unique(keys, return_inverse=True)
                merged = np.zeros((len(keys), sums.shape[1]))
                np.add.at(merged, inverse, sums)
                counts = np.bincount(inverse, weights=counts).astype(np.int64)
                sums = merged
            following = plan.global_index(plan.windows[chunks[n + 1][0]]) if n + 1 < len(chunks) else np.inf
            final = keys < following
            if final.any():
                writer.write_table(rows_of(keys[final], sums[final], counts[final]))
                rows += int(final.sum())
                keys, sums, counts = keys[~final], sums[~final], counts[~final]
        writer.close()

    files.atomic_write(path, write)
    return rows


# --- manifest ---------------------------------------------------------------------------------

def _file_digest(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_fingerprint(model: GLM) -> str:
    """sha256 of the config and of every parameter's sum and sum of squares (cheap at any size)."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        leaf = jnp.asarray(leaf, jnp.float32)
        digest.update(np.asarray([jnp.sum(leaf), jnp.sum(leaf * leaf)], np.float64).tobytes())
    return digest.hexdigest()


def _transform_fingerprint(transform: features.FeatureTransform) -> str:
    digest = hashlib.sha256()
    for array in (transform.mean, transform.std, transform.pca_mean, transform.pca_components,
                  transform.pca_explained_variance):
        digest.update(np.ascontiguousarray(array, np.float64).tobytes())
    return digest.hexdigest()


def _open_manifest(out_dir: pathlib.Path, identity: dict) -> dict:
    """The run's manifest: created, or an existing one of the same identity (else an error)."""
    path = out_dir / MANIFEST_FILE
    if path.is_file():
        manifest = json.loads(path.read_text())
        saved = manifest.get("identity", {})
        differ = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        if differ:
            raise InferenceInputError(f"{out_dir} holds results of another run (differs in {', '.join(differ)}); "
                                      f"use another output directory or delete it")
        return manifest
    manifest = {"format": MANIFEST_FORMAT, "identity": identity, "complete": False, "runs": []}
    files.atomic_write(path, lambda h: h.write(json.dumps(manifest, indent=1).encode()))
    return manifest


def _save_manifest(out_dir: pathlib.Path, manifest: dict) -> None:
    files.atomic_write(out_dir / MANIFEST_FILE, lambda h: h.write(json.dumps(manifest, indent=1).encode()))


# --- checkpoint features and ESM2 -------------------------------------------------------------

def training_data_dir(checkpoint: str | pathlib.Path) -> pathlib.Path | None:
    """The make-shards directory a training workdir was trained on (its config.json's
    data.train_pattern, relative to the working directory or to an ancestor of the workdir),
    or None when the checkpoint does not say."""
    checkpoint = pathlib.Path(checkpoint).absolute()
    config_file = checkpoint / "config.json"
    if not config_file.is_file():
        return None
    pattern = json.loads(config_file.read_text()).get("data", {}).get("train_pattern") or ""
    if not pattern:
        return None
    candidates = [pathlib.Path(pattern)] + [base / pattern for base in checkpoint.parents]
    for candidate in candidates:
        folder = candidate if candidate.is_dir() else candidate.parent
        if (folder / "normalization.npz").is_file():
            return folder.absolute()
    return None


def resolve_features(checkpoint, feature_transform) -> tuple[features.FeatureTransform, str, dict]:
    """(transform, where it came from, the make-shards dataset_info or {}).

    feature_transform: a FeatureTransform; a make-shards directory; an npz (this project's, with
    its PCA); or None = the checkpoint's own: normalization.npz in the model directory, else the
    make-shards directory the training workdir was trained on."""
    if isinstance(feature_transform, features.FeatureTransform):
        return feature_transform, "given", {}
    if feature_transform is None:
        checkpoint = pathlib.Path(checkpoint)
        if (checkpoint / "normalization.npz").is_file():
            feature_transform = checkpoint
        else:
            feature_transform = training_data_dir(checkpoint)
            if feature_transform is None:
                raise InferenceInputError(
                    f"{checkpoint}: cannot tell which features the model was trained on (no normalization.npz "
                    f"and no make-shards directory in config.json data.train_pattern); pass --features DIR "
                    f"(the make-shards output) or --normalization")
    path = pathlib.Path(feature_transform)
    if path.is_dir():
        info_file = path / "dataset_info.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        if not (path / "normalization.npz").is_file():
            raise InferenceInputError(f"{path}: no normalization.npz (expected a make-shards output directory)")
        return features.load_feature_transform(path / "normalization.npz"), str(path / "normalization.npz"), info
    if not path.is_file():
        raise FileNotFoundError(f"features not found: {path}")
    return features.load_feature_transform(path), str(path), {}


def _esm2_dimension(model_dir: pathlib.Path) -> int:
    config_file = pathlib.Path(model_dir) / "config.json"
    if config_file.is_file():
        return int(json.loads(config_file.read_text())["hidden_size"])
    from glm_jax.proteins import esm2
    return esm2.load_esm2(model_dir)[0].hidden_size


def _attention_change(attention_impl: str, clip_distances: bool) -> dict:
    """The GLMConfig changes that select an attention implementation and distance clipping."""
    from glm_jax import kernels
    try:
        kernels.check_name(attention_impl)
    except kernels.AttentionConfigError as error:
        raise InferenceInputError(str(error)) from None
    return {"attention": attention_impl, **({"clip_distances": True} if clip_distances else {})}


def load_checkpoint(checkpoint, **config_changes) -> GLM:
    from glm_jax.inference.predict import load_any_model
    return load_any_model(str(checkpoint), **config_changes)


# --- the run ----------------------------------------------------------------------------------

def infer_genomes(genome_paths: Sequence[str | pathlib.Path], checkpoint: str | pathlib.Path,
                  output_dir: str | pathlib.Path, *, esm2_dir=None, store_dir=None, feature_transform=None,
                  window: int = 30, stride: int | None = None, batch_size: int = 32, layers: Sequence[int] = (),
                  hypotheses: bool = False, context_only: bool = False, attention: str | None = None,
                  include_esm2: bool = False, attention_impl: str = "reference", clip_distances: bool = False,
                  progress: bool = True,
                  contig_table=None, shards_dir=None, chunk_windows: int = 256, compute_dtype: str = "float32",
                  devices: Sequence[jax.Device] | None = None, log: Callable[[str], None] = print) -> pathlib.Path:
    """Per-gene gLM results of genomes (or of a make-shards directory, `shards_dir`) in
    `output_dir` (see the module docstring); returns `output_dir`. Resumable.

    checkpoint: model directory or training workdir. feature_transform: see `resolve_features`.
    esm2_dir: default the one the training shards were made with, else `glm-jax fetch-esm2`'s.
    store_dir: ESM2 embedding store (default output_dir/embeddings). layers: hidden states to add
    as `layer_<i>` (0 = embedding output, num_layers = last). hypotheses: the num_pred hypotheses,
    their probabilities and the PCA label. context_only: each gene masked in turn (one model row
    per gene) -> context_embedding (+ context_hypotheses/probabilities). attention: "pairs" ->
    pairs.parquet, "maps" -> maps/. include_esm2: the raw ESM2 vector. devices: default all local."""
    out_dir = pathlib.Path(output_dir)
    model = load_checkpoint(checkpoint, compute_dtype=compute_dtype,
                            **_attention_change(attention_impl, clip_distances))
    config = model.config
    options = InferenceOptions(window, stride, tuple(int(x) for x in layers), hypotheses, context_only, attention,
                               include_esm2, attention_impl, chunk_windows)
    options.check(config.num_layers, config.max_position_embeddings, config.clip_distances)
    if shards_dir is not None:
        if genome_paths:
            raise InferenceInputError("give genome files or a shards directory, not both")
        if include_esm2:
            raise InferenceInputError(f"{shards_dir}: shards hold no raw ESM2 embeddings; drop --esm2")
        from glm_jax.data import shards
        info = shards.load_dataset_info(shards_dir)
        if info["emb_dim"] != config.emb_dim:
            raise InferenceInputError(f"{shards_dir}: emb_dim {info['emb_dim']} (dataset_info.json) differs from "
                                      f"the checkpoint's emb_dim {config.emb_dim} ({checkpoint})")
        plan, featurize = plan_from_shards(shards_dir)
        identity_inputs = {"shards": {f.name: f.stat().st_size for f in sorted(pathlib.Path(shards_dir).glob("*.tfrecord"))}}
        feature_source = str(shards_dir)
    else:
        if not genome_paths:
            raise InferenceInputError("no genome files given")
        transform, feature_source, info = resolve_features(checkpoint, feature_transform)
        esm2_dir = pathlib.Path(esm2_dir) if esm2_dir else _default_esm2_dir(info)
        esm_dim = _esm2_dimension(esm2_dir)
        if transform.mean.shape[0] != esm_dim:
            raise InferenceInputError(f"{feature_source}: normalisation is {transform.mean.shape[0]}-d but the ESM2 "
                                      f"model {esm2_dir} gives {esm_dim}-d embeddings")
        if config.emb_dim != esm_dim + 1:
            raise InferenceInputError(f"{checkpoint}: emb_dim {config.emb_dim} (glm_config.json) does not fit the "
                                      f"ESM2 model {esm2_dir}: {esm_dim}-d embeddings + orientation = {esm_dim + 1}")
        if transform.num_pc != config.num_pc:
            raise InferenceInputError(f"{feature_source}: {transform.num_pc - 1} PCA components + orientation "
                                      f"!= the checkpoint's num_pc {config.num_pc} ({checkpoint})")
        corpus = read_corpus(genome_paths, contig_table)
        log(f"read {corpus.num_genes} genes on {len(corpus.contigs)} contigs from {len(genome_paths)} file(s); "
            f"skipped {len(corpus.skipped)} CDS {corpus.summary()['skipped_by_reason']}")
        plan = plan_windows(corpus.contigs, options.window, options.step)
        store = _embed(plan, esm2_dir, store_dir or out_dir / "embeddings", info, progress, log)
        featurize = GenomeFeatures(plan, store, transform, options.window, info.get("dtype", "float16"))
        identity_inputs = {"genomes": [[pathlib.Path(p).name, _file_digest(pathlib.Path(p))] for p in genome_paths],
                           "contig_table": _file_digest(pathlib.Path(contig_table)) if contig_table else None,
                           "features": _transform_fingerprint(transform), "esm2": store.model["fingerprint"],
                           "esm2_layer": store.model["layer"]}
    identity = {"inputs": identity_inputs, "model": _model_fingerprint(model), "compute_dtype": compute_dtype,
                "options": dataclasses.asdict(options), "windows": len(plan.windows), "genes": int(plan.offsets[-1])}
    identity = json.loads(json.dumps(identity))  # as the manifest stores it (tuples become lists)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _open_manifest(out_dir, identity)
    if manifest["complete"] and (out_dir / GENES_FILE).is_file():
        log(f"{out_dir}: already complete")
        return out_dir
    for folder in (PARTS_DIR,) + ((MAPS_DIR,) if attention == "maps" else ()):
        (out_dir / folder).mkdir(exist_ok=True)
        for stale in (out_dir / folder).glob(".*.tmp"):  # a killed writer's leftovers
            stale.unlink()
    chunks = plan.chunks(options.chunk_windows)
    todo = [n for n in range(len(chunks)) if not _part(out_dir, "genes", n).is_file()]
    devices = list(devices) if devices is not None else jax.local_devices()
    runner = ModelRunner(model, devices, batch_size, options)
    log(f"{int(plan.offsets[-1])} genes on {len(plan.contigs)} contigs -> {len(plan.windows)} windows of <= "
        f"{options.window} (stride {options.step}) in {len(chunks)} chunks, {len(chunks) - len(todo)} already done; "
        f"{len(devices)} device(s), {runner.batch_size} windows per call; features: {feature_source}")
    from glm_jax.progress import Progress
    done_windows = sum(len(chunks[n]) for n in range(len(chunks)) if n not in set(todo))
    with Progress(total=len(plan.windows), initial=done_windows, unit="window", desc="infer", enabled=progress) as bar:
        for n in todo:
            write_chunk(out_dir, n, compute_chunk(plan, chunks[n], featurize, runner, options))
            bar.update(len(chunks[n]))
    manifest["runs"].append({"computed_chunks": todo, "model_calls": runner.calls, "devices": len(devices)})
    _save_manifest(out_dir, manifest)
    _concatenate_parts([_part(out_dir, "genes", n) for n in range(len(chunks))], out_dir / GENES_FILE)
    summary = {"genes": int(plan.offsets[-1]), "windows": len(plan.windows), "contigs": len(plan.contigs)}
    if attention == "pairs":
        summary["pairs"] = _assemble_pairs(plan, chunks, out_dir, out_dir / PAIRS_FILE)
    if attention == "maps":
        _concatenate_parts([_part(out_dir, "windows", n) for n in range(len(chunks))], out_dir / MAPS_DIR / WINDOWS_FILE)
    manifest.update(complete=True, summary=summary)
    _save_manifest(out_dir, manifest)
    for part in (out_dir / PARTS_DIR).glob("*.parquet"):
        part.unlink()
    (out_dir / PARTS_DIR).rmdir()
    log(f"wrote {out_dir / GENES_FILE}: {summary}")
    return out_dir


def _default_esm2_dir(info: dict) -> pathlib.Path:
    from glm_jax.proteins import embed as protein_embed
    trained_with = info.get("esm2", {}).get("model_dir")
    if trained_with and pathlib.Path(trained_with).exists():
        return pathlib.Path(trained_with)
    return protein_embed.default_esm2_dir()


def _embed(plan: Plan, esm2_dir, store_dir, info: dict, progress: bool, log):
    """Every distinct protein of the plan in the ESM2 store (resumable; the training layer)."""
    from glm_jax.proteins import embed as protein_embed
    proteins = list(dict.fromkeys(g.protein for c in plan.contigs for g in c.genes))
    layer = info.get("esm2", {}).get("layer")
    store = protein_embed.embed_proteins(proteins, store_dir, esm2_dir, layer=layer, progress=progress)
    run = store.last_run
    log(f"ESM2: {run.unique} distinct proteins, {run.already_stored} already in {store_dir}, {run.embedded} embedded")
    return store


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
