"""TFRecord shards of contig windows, their tfds metadata, and resumable per-host batch readers.

Layout of a dataset directory (written by `glm-jax make-shards`):
    train-00000-of-00016.tfrecord ...    one tf.train.Example per window; a window's shard is a hash
    eval-00000-of-00008.tfrecord ...     of (seed, genome, window id), so each shard is a random
                                         sample of its split, mixed by a bounded shuffle buffer
    dataset_info.json                    emb_dim, num_pc, max_genes, dtype, per-shard counts and
                                         bytes, normalisation, window and corpus summary
    normalization.npz                    the FeatureTransform used (fitted or copied)
    tfds/dataset_info.json, features.json  metadata for `tfds.builder_from_directory(DIR / "tfds")`

Record schema (S = max_genes, E = emb_dim, K = num_pc; pad positions are 0 / b""):
    inputs_embeds   bytes   [S, E] float16|float32 raw little-endian (tfds Tensor, encoding=bytes)
    labels          bytes   [S, K] same dtype
    attention_mask  int64   [S]    1 gene, 0 pad
    prot_ids        int64   [S]    running 1-based gene counter over the split (the original's prot_ids)
    protein_hash    int64   [S]    first 8 bytes of sha256(protein sequence), signed
    strand          int64   [S]    +1 / -1
    gene_ids        bytes   [S]    gene identifiers
    gene_labels     bytes   [S]    JSON object of the gene's label qualifiers (is_phage, phrog, function, ...)
    num_genes       int64   []     genes in the window
    window_index    int64   []     index of the window in its split (genome order)
    window_start    int64   []     offset of the window's first gene in its contig
    contig_id       bytes   []     `<contig>_<segment>` is the original's window name
    genome          bytes   []     source file name

TensorFlow is imported only inside the functions that read or write TFRecords: the rest of glm_jax
(and `InMemoryWindows`) runs without it.

Readers (`ShardReader` over TFRecords, `InMemoryWindows` over numpy arrays) share one contract:
  * per-host: ShardReader host p of P reads only shards p, p+P, ...; InMemoryWindows holds every
    window and host p yields rows [p*b, (p+1)*b) of each global batch of b*P windows, so its global
    batches are the same for any number of processes
  * a continuous stream of epochs; epoch e visits the data in an order fixed by (seed, e)
    (ShardReader: the host's shards in a permuted order, shard j shuffled by (seed, e, j);
    InMemoryWindows: one permutation of all windows)
  * batches of `batch_size` windows per host (global batch = batch_size * process_count) as dicts
    inputs_embeds float32 [B, S, E], labels float32 [B, S, K], attention_mask int32 [B, S],
    prot_ids int32 [B, S], window_index int64 [B] (+ gene_ids, contig_id, genome, window_start, strand, gene_labels with include_metadata)
  * `state()` is a global position (JSON, the same on every host): {"consumed", "process_count",
    seed, shuffle, global batch size, dataset size ...}. `restore(state)` continues exactly there
    with the same process count; with another one, InMemoryWindows still continues exactly, and
    ShardReader continues the epoch with each shard's windows not yet read (every host has read the
    same number of windows, so process 0's state tells how far each shard of every host got).
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import pathlib
from typing import Iterator, Sequence

import numpy as np

from glm_jax import files
from glm_jax.errors import CheckpointError, InputError

INFO_FILE = "dataset_info.json"
TFDS_DIR = "tfds"
FORMAT_NAME = "glm-jax-windows"
FORMAT_VERSION = 1
NUMERIC_KEYS = ("inputs_embeds", "labels")
INT_KEYS = ("attention_mask", "prot_ids", "protein_hash", "strand")
STRING_KEYS = ("gene_ids", "gene_labels")
SCALAR_INT_KEYS = ("num_genes", "window_index", "window_start")
SCALAR_STRING_KEYS = ("contig_id", "genome")
RECORD_KEYS = NUMERIC_KEYS + INT_KEYS + STRING_KEYS + SCALAR_INT_KEYS + SCALAR_STRING_KEYS


class ShardError(InputError):
    """A missing, truncated or corrupt shard; the message names the file."""


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def choose_num_shards(num_windows: int, bytes_per_window: int, multiple_of: int = 8,
                      target_bytes: int = 128 << 20, minimum: int = 8) -> int:
    """Shards for multi-host reading: >= `minimum`, about `target_bytes` each (a shard is the unit
    of in-memory shuffling), rounded up to a multiple of `multiple_of` (the host count, or a
    number that all planned host counts divide) so every host gets the same number of shards."""
    wanted = max(minimum, -(-num_windows * bytes_per_window // target_bytes))
    return -(-wanted // multiple_of) * multiple_of


def protein_hash(sequence: str) -> int:
    """Signed int64 from sha256 of the sequence (the dedupe key, small enough for an int64 feature)."""
    return int.from_bytes(hashlib.sha256(sequence.encode()).digest()[:8], "little", signed=True)


# --- writing ----------------------------------------------------------------------------------

class ShardWriter:
    """Writes one split's shards. Without `shard_of`, window j of the stream goes to shard
    j % num_shards; `write(batch, shard_of)` sends window i of the batch to shard `shard_of[i]`.

    `shards` (default: all) are the shard indices this writer owns (one host's share); a window
    routed elsewhere is an error. `shuffle_buffer` > 0 holds up to that many serialized windows per
    shard and writes a random one of them (seeded by `seed`, the split and the shard) each time the
    buffer is full, the rest in random order at `close()`: a shard fed in genome order comes out
    mixed within that window distance, in a fixed order, with memory bounded by the buffer.

    `write(batch)` takes arrays with a leading window axis [W, ...] holding every RECORD_KEYS
    entry (strings as python/numpy bytes or str). `close()` returns the stats of the owned shards
    for dataset_info.json. Use as a context manager."""

    def __init__(self, out_dir: str | pathlib.Path, split: str, num_shards: int, *, shards: Sequence[int] | None = None,
                 shuffle_buffer: int = 0, seed: int = 0):
        import tensorflow as tf  # lazy: only writing/reading TFRecords needs TensorFlow
        self._tf = tf
        self.out_dir = pathlib.Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.num_shards = num_shards
        self.shards = list(range(num_shards)) if shards is None else list(shards)
        self.files = {i: self.out_dir / shard_name(split, i, num_shards) for i in self.shards}
        self._writers = {i: tf.io.TFRecordWriter(str(f)) for i, f in self.files.items()}
        self._counts = dict.fromkeys(self.shards, 0)
        self._next = 0
        self._buffer_size = shuffle_buffer
        self._buffers: dict[int, list[bytes]] = {i: [] for i in self.shards}
        split_number = int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")
        self._rngs = {i: np.random.default_rng([seed, split_number, i]) for i in self.shards}

    def write(self, batch: dict, shard_of: Sequence[int] | None = None) -> None:
        n = len(batch["inputs_embeds"])
        for i in range(n):
            shard = self._next % self.num_shards if shard_of is None else int(shard_of[i])
            if shard not in self._writers:
                raise ValueError(f"window {i} routed to shard {shard}, not one of this writer's {self.shards}")
            self._put(shard, self._example(batch, i))
            self._next += 1

    def _put(self, shard: int, example: bytes) -> None:
        self._counts[shard] += 1
        if not self._buffer_size:
            self._writers[shard].write(example)
            return
        buffer = self._buffers[shard]
        buffer.append(example)
        if len(buffer) >= self._buffer_size:
            j = int(self._rngs[shard].integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            self._writers[shard].write(buffer.pop())

    def _example(self, batch: dict, i: int) -> bytes:
        tf = self._tf
        as_bytes = lambda v: v if isinstance(v, bytes) else str(v).encode()
        feature = {}
        for key in NUMERIC_KEYS:
            # little-endian raw bytes: what tfds' Tensor(encoding=bytes) and tf.io.decode_raw read
            raw = np.ascontiguousarray(batch[key][i], dtype=batch[key].dtype.newbyteorder("<")).tobytes()
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[raw]))
        for key in INT_KEYS:
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=np.asarray(batch[key][i], np.int64)))
        for key in STRING_KEYS:
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[as_bytes(v) for v in batch[key][i]]))
        for key in SCALAR_INT_KEYS:
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(batch[key][i])]))
        for key in SCALAR_STRING_KEYS:
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[as_bytes(batch[key][i])]))
        return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    def close(self) -> list[dict]:
        """Writes what the shuffle buffers hold, flushes the shards (idempotent) and returns their stats."""
        for shard, writer in self._writers.items():
            buffer = self._buffers[shard]
            for j in self._rngs[shard].permutation(len(buffer)):
                writer.write(buffer[j])
            self._buffers[shard] = []
            writer.close()
        self._writers = {}
        return [{"file": self.files[i].name, "num_windows": self._counts[i], "num_bytes": self.files[i].stat().st_size}
                for i in self.shards]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_dataset_info(out_dir: str | pathlib.Path, info: dict) -> None:
    """Writes our `dataset_info.json` and the tfds metadata (tfds/) for the same shards.

    `info` needs emb_dim, num_pc, max_genes, dtype and splits = {name: {"shards": [...]}}.
    dataset_info.json is written last and atomically: it marks the dataset complete."""
    out_dir = pathlib.Path(out_dir)
    info = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **info}
    _write_tfds_metadata(out_dir, info)
    files.write_text_atomic(out_dir / INFO_FILE, json.dumps(info, indent=1))


def _tfds_features(info: dict):
    import tensorflow_datasets as tfds
    s, dtype = info["max_genes"], np.dtype(info["dtype"])
    tensor = tfds.features.Tensor
    spec = {"inputs_embeds": tensor(shape=(s, info["emb_dim"]), dtype=dtype, encoding=tfds.features.Encoding.BYTES),
            "labels": tensor(shape=(s, info["num_pc"]), dtype=dtype, encoding=tfds.features.Encoding.BYTES)}
    spec |= {k: tensor(shape=(s,), dtype=np.int64) for k in INT_KEYS}
    spec |= {k: tensor(shape=(s,), dtype=np.object_) for k in STRING_KEYS}
    spec |= {k: tensor(shape=(), dtype=np.int64) for k in SCALAR_INT_KEYS}
    spec |= {k: tensor(shape=(), dtype=np.object_) for k in SCALAR_STRING_KEYS}
    return tfds.features.FeaturesDict(spec)


def _write_tfds_metadata(out_dir: pathlib.Path, info: dict) -> None:
    """tfds reads the shards in place: the split's filepath template points one folder up."""
    tfds_dir = out_dir / TFDS_DIR
    tfds_dir.mkdir(exist_ok=True)
    _tfds_features(info).save_config(str(tfds_dir))
    splits = [{"name": name, "numBytes": str(sum(s["num_bytes"] for s in split["shards"])),
               "shardLengths": [str(s["num_windows"]) for s in split["shards"]],
               "filepathTemplate": "../{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"}
              for name, split in info["splits"].items()]
    tfds_info = {"name": "glm_windows", "version": "1.0.0", "fileFormat": "tfrecord",
                 "description": f"gLM contig windows (emb_dim {info['emb_dim']}, num_pc {info['num_pc']}); see ../{INFO_FILE}",
                 "splits": splits}
    files.write_text_atomic(tfds_dir / "dataset_info.json", json.dumps(tfds_info, indent=1))


def tfds_builder(dataset_dir: str | pathlib.Path):
    """`tfds.builder_from_directory` over the shards of a make-shards directory (offline, in place)."""
    import tensorflow_datasets as tfds
    return tfds.builder_from_directory(str(pathlib.Path(dataset_dir) / TFDS_DIR))


def load_dataset_info(dataset_dir: str | pathlib.Path) -> dict:
    path = pathlib.Path(dataset_dir) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {dataset_dir} a make-shards output?")
    return json.loads(path.read_text())


# --- the shared stream contract ---------------------------------------------------------------

POSITION_FORMAT = "global"  # states without it are per-host positions of glm-jax before issue 21


class _BatchStream:
    """Position bookkeeping shared by both readers: `consumed` windows of a continuous epoch stream
    (ShardReader: this host's windows; InMemoryWindows: all hosts' windows)."""

    def __init__(self, batch_size: int, seed: int, shuffle: bool, num_epochs: int | None,
                 process_index: int, process_count: int, drop_remainder: bool):
        if batch_size < 1 or not 0 <= process_index < process_count:
            raise InputError(f"need batch_size >= 1 and 0 <= process_index < process_count, got "
                             f"{batch_size}, {process_index}, {process_count}")
        self.batch_size, self.seed, self.shuffle, self.num_epochs = batch_size, seed, shuffle, num_epochs
        self.process_index, self.process_count, self.drop_remainder = process_index, process_count, drop_remainder
        self._consumed = 0
        self._iterator = None

    examples_per_epoch: int  # windows this host sees per epoch; set by subclasses

    def _epoch_order(self, epoch: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def _fingerprint(self) -> dict:
        """What a state must agree on with this reader (the data and its order), whatever the process count."""
        return {"seed": self.seed, "shuffle": self.shuffle, "global_batch_size": self.batch_size * self.process_count}

    def state(self) -> dict:
        return {"position": POSITION_FORMAT, "consumed": self._consumed, "process_count": self.process_count,
                **self._fingerprint()}

    def restore(self, state: dict) -> None:
        """Continue from `state` (written by this reader on any number of processes); the rest of
        the state must match this reader. Unknown keys (e.g. "process_index") are ignored."""
        if state.get("position") != POSITION_FORMAT:  # older per-host state: same meaning on one process
            state = {**state, "global_batch_size": state.get("batch_size", 0) * state.get("process_count", 1),
                     "num_windows": state.get("examples_per_epoch", 0) * state.get("process_count", 1)}
        mismatched = {k: (state.get(k), v) for k, v in self._fingerprint().items() if state.get(k) != v}
        if state.get("position") != POSITION_FORMAT and state.get("process_count", 1) > 1:
            raise CheckpointError(f"reader state written by {state['process_count']} processes with an older glm-jax "
                                  "(a per-host position): resume it with that glm-jax, or start a new run")
        if mismatched:
            raise CheckpointError(f"reader state does not match this reader (saved, current): {mismatched}")
        self._restore_position(state)
        self._iterator = None

    def _restore_position(self, state: dict) -> None:
        self._consumed = int(state["consumed"])

    def _taken(self, batch: dict) -> int:
        """Windows of the stream a yielded batch used up."""
        return len(batch["inputs_embeds"])

    @property
    def epoch(self) -> int:
        return self._consumed // self.examples_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._batches(self._consumed)
        batch = next(self._iterator)
        self._consumed += self._taken(batch)
        return batch

    def _batches(self, consumed: int) -> Iterator[dict]:
        raise NotImplementedError


# --- TFRecord reader --------------------------------------------------------------------------

def _resolve_files(files: str | pathlib.Path | Sequence, split: str) -> list[pathlib.Path]:
    """A glob pattern, a make-shards directory (+ split), or a list of files -> sorted paths."""
    if isinstance(files, (str, pathlib.Path)):
        files = pathlib.Path(files)
        if files.is_dir() and not (files / INFO_FILE).is_file():
            raise ShardError(f"{files}: no {INFO_FILE}: not a make-shards output, or one that did not finish "
                             "(rerun make-shards)")
        paths = sorted(files.glob(f"{split}-*-of-*.tfrecord")) if files.is_dir() else sorted(map(pathlib.Path, glob.glob(str(files))))
    else:
        paths = sorted(map(pathlib.Path, files))
    if not paths:
        raise ShardError(f"no shard files match {files!s} (split {split!r})")
    return paths


class ShardReader(_BatchStream):
    """Per-host batches from TFRecord shards with deterministic shuffling and exact resume.

    files: glob pattern, make-shards directory (with `split`), or list of shard paths; the shards
    of all hosts. Shard counts and sizes come from the directory's dataset_info.json: a shard whose
    size differs is reported as truncated before reading. `shuffle_buffer` caps the in-shard
    shuffle (default: the whole shard, which the writer keeps near 128 MB)."""

    def __init__(self, files, batch_size: int, *, split: str = "train", seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                 drop_remainder: bool = True, shuffle_buffer: int | None = None, include_metadata: bool = False):
        super().__init__(batch_size, seed, shuffle, num_epochs, process_index, process_count, drop_remainder)
        all_files = _resolve_files(files, split)
        if len(all_files) < process_count:
            raise ShardError(f"{len(all_files)} shards cannot feed {process_count} hosts; write more shards (--num-shards)")
        self.files = all_files[process_index::process_count]
        self.shard_ids = list(range(process_index, len(all_files), process_count))  # global indices of self.files
        self.info = load_dataset_info(all_files[0].parent)
        self.counts = self._shard_counts()
        by_name = self._listed()
        self.all_counts = [by_name[f.name]["num_windows"] if f.name in by_name else 0 for f in all_files]
        self.examples_per_epoch = sum(self.counts)
        if self.examples_per_epoch == 0:
            raise ShardError(f"host {process_index}/{process_count} has no windows in {[f.name for f in self.files]}")
        self.shuffle_buffer = shuffle_buffer or max(self.all_counts)  # the same for every process count
        self.include_metadata = include_metadata
        self._base: list[tuple[int, int]] | None = None  # per-shard progress a resume on another layout starts from
        self._resumed_from: dict | None = None

    def _fingerprint(self) -> dict:
        return {**super()._fingerprint(), "num_windows": sum(self.all_counts)}

    def state(self) -> dict:
        return super().state() | ({"resumed_from": self._resumed_from} if self._resumed_from else {})

    def _restore_position(self, state: dict) -> None:
        if "resumed_from" not in state and state.get("process_count", 1) == self.process_count:
            self._base, self._resumed_from, self._consumed = None, None, int(state["consumed"])
            return
        progress = self._global_progress(state)
        self._base = [progress[j] for j in self.shard_ids]
        self._resumed_from = {k: v for k, v in state.items() if k != "process_index"}
        self._consumed = 0

    def _global_progress(self, state: dict) -> list[tuple[int, int]]:
        """(visits completed, windows read of the next visit) of every shard at `state`: each of its
        `process_count` hosts read `consumed` windows of its shards, from where `resumed_from` left them."""
        progress = self._global_progress(state["resumed_from"]) if state.get("resumed_from") else [(0, 0)] * len(self.all_counts)
        hosts = state.get("process_count", 1)
        for host in range(hosts):
            ids = range(host, len(self.all_counts), hosts)
            after = _advance([progress[j] for j in ids], [self.all_counts[j] for j in ids], int(state["consumed"]),
                             self._epoch_order)
            for j, shard_progress in zip(ids, after):
                progress[j] = shard_progress
        return progress

    def _listed(self) -> dict:
        return {s["file"]: s for split in self.info["splits"].values() for s in split["shards"]}

    def _shard_counts(self) -> list[int]:
        by_name = self._listed()
        counts = []
        for f in self.files:
            if f.name not in by_name:
                raise ShardError(f"{f}: not listed in {f.parent / INFO_FILE}")
            if not f.is_file():
                raise ShardError(f"{f}: shard missing")
            expected, size = by_name[f.name]["num_bytes"], f.stat().st_size
            if size != expected:
                raise ShardError(f"{f}: truncated or corrupt shard ({size} bytes, dataset_info.json says {expected})")
            counts.append(by_name[f.name]["num_windows"])
        return counts

    def _shard_plan(self, consumed: int) -> Iterator[tuple[str, int, int]]:
        """(file, shuffle seed, windows to skip) for every shard visit from position `consumed` on."""
        progress = _advance(self._base or [(0, 0)] * len(self.files), self.counts, consumed, self._epoch_order)
        for k, epoch, skip in _visits(progress, self._epoch_order, self.num_epochs):
            shard_seed = int(np.random.default_rng([self.seed, epoch, self.shard_ids[k]]).integers(2 ** 62))
            yield str(self.files[k]), shard_seed, skip

    def _dataset(self, consumed: int):
        import tensorflow as tf
        plan = tf.data.Dataset.from_generator(
            lambda: self._shard_plan(consumed),
            output_signature=(tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.int64)))

        def records(path, shard_seed, skip):
            ds = tf.data.TFRecordDataset(path)
            if self.shuffle:
                ds = ds.shuffle(self.shuffle_buffer, seed=shard_seed, reshuffle_each_iteration=False)
            return ds.skip(skip)

        ds = plan.flat_map(records).batch(self.batch_size, drop_remainder=self.drop_remainder)
        return ds.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)

    def _parse(self, serialized):
        import tensorflow as tf
        s, dtype = self.info["max_genes"], tf.as_dtype(self.info["dtype"])
        spec = {k: tf.io.FixedLenFeature([], tf.string) for k in NUMERIC_KEYS}
        spec |= {"attention_mask": tf.io.FixedLenFeature([s], tf.int64), "prot_ids": tf.io.FixedLenFeature([s], tf.int64),
                 "window_index": tf.io.FixedLenFeature([], tf.int64)}
        if self.include_metadata:
            spec |= {"gene_ids": tf.io.FixedLenFeature([s], tf.string), "contig_id": tf.io.FixedLenFeature([], tf.string),
                     "genome": tf.io.FixedLenFeature([], tf.string), "window_start": tf.io.FixedLenFeature([], tf.int64),
                     "strand": tf.io.FixedLenFeature([s], tf.int64), "gene_labels": tf.io.FixedLenFeature([s], tf.string)}
        x = tf.io.parse_example(serialized, spec)
        width = {"inputs_embeds": self.info["emb_dim"], "labels": self.info["num_pc"]}
        for key in NUMERIC_KEYS:
            x[key] = tf.cast(tf.reshape(tf.io.decode_raw(x[key], dtype), [-1, s, width[key]]), tf.float32)
        x["attention_mask"] = tf.cast(x["attention_mask"], tf.int32)
        x["prot_ids"] = tf.cast(x["prot_ids"], tf.int32)
        return x

    def _batches(self, consumed: int) -> Iterator[dict]:
        import tensorflow as tf
        iterator = iter(self._dataset(consumed).as_numpy_iterator())
        while True:
            try:
                yield next(iterator)
            except StopIteration:
                return
            except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as error:
                raise _locate_corruption(self.files, error) from error


def _visits(progress: list[tuple[int, int]], epoch_order, num_epochs: int | None) -> Iterator[tuple[int, int, int]]:
    """(shard k, epoch, windows to skip) of every shard visit from per-shard `progress` [(visits
    completed, windows read of the next visit)] on: epoch e visits, in `epoch_order(e, n)`, the
    shards that have not completed it."""
    epoch = min(visits for visits, _ in progress)
    while num_epochs is None or epoch < num_epochs:
        for k in epoch_order(epoch, len(progress)):
            visits, skip = progress[k]
            if visits <= epoch:
                yield int(k), epoch, skip if visits == epoch else 0
        epoch += 1


def _advance(progress: list[tuple[int, int]], counts: list[int], consumed: int, epoch_order) -> list[tuple[int, int]]:
    """Per-shard progress after a host reads `consumed` more windows of its shards (`counts`
    windows each) from `progress`; whole epochs at once when every shard is at an epoch's start."""
    progress, total = list(progress), sum(counts)
    while consumed > 0 and total > 0:
        if len({visits for visits, _ in progress}) == 1 and not any(skip for _, skip in progress):
            epochs, consumed = divmod(consumed, total)
            progress = [(progress[0][0] + epochs, 0)] * len(progress)
        first_epoch = min(visits for visits, _ in progress)
        for k, epoch, skip in _visits(list(progress), epoch_order, None):
            if epoch > first_epoch or consumed == 0:
                break
            taken = min(consumed, counts[k] - skip)
            consumed -= taken
            progress[k] = (epoch + 1, 0) if skip + taken == counts[k] else (epoch, skip + taken)
    return progress


def _locate_corruption(files: Sequence[pathlib.Path], error: Exception) -> ShardError:
    """Re-reads each shard to name the one that failed (tf.data's error does not say which file)."""
    import tensorflow as tf
    for f in files:
        try:
            for _ in tf.data.TFRecordDataset(str(f)):
                pass
        except tf.errors.OpError as shard_error:
            return ShardError(f"{f}: corrupt or truncated shard: {shard_error.message}")
    return ShardError(f"reading shards {[f.name for f in files]} failed: {error}")


def read_shards(files, split: str = "train") -> dict[str, np.ndarray]:
    """Every window of the given shards, unshuffled, in file order: arrays as `ShardReader`
    yields them plus gene_ids/contig_id/genome/window_start/strand/gene_labels (for tests, small
    datasets and `glm-jax infer --shards`)."""
    reader = ShardReader(files, batch_size=1024, split=split, shuffle=False, num_epochs=1, drop_remainder=False,
                         include_metadata=True)
    batches = list(reader)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# --- in-memory reader -------------------------------------------------------------------------

# the original's batch files name the model arrays differently; both names are accepted
ORIGINAL_ARRAY_NAMES = {"embeds": "inputs_embeds", "label_embeds": "labels"}


def rename_original_arrays(arrays: dict) -> dict:
    """Maps the original's `embeds` / `label_embeds` to `inputs_embeds` / `labels` (arrays already
    under our names win)."""
    renamed = dict(arrays)
    for original, ours in ORIGINAL_ARRAY_NAMES.items():
        if original in renamed and ours not in renamed:
            renamed[ours] = renamed.pop(original)
    return renamed
_OUT_DTYPES = {"inputs_embeds": np.float32, "labels": np.float32, "attention_mask": np.int32, "prot_ids": np.int32}


class InMemoryWindows(_BatchStream):
    """The `ShardReader` contract over numpy arrays with a leading window axis [N, ...]
    (inputs_embeds, labels, attention_mask, optional prot_ids / window_index / others, which are
    passed through). Each epoch is one seeded permutation of all N windows, cut into global
    batches of batch_size * P; host p of P yields rows [p * batch_size, (p + 1) * batch_size) of
    each (rows p, p+P, ... of a last, smaller one), so any process count sees the same global
    batches and `consumed` counts the windows of all hosts."""

    def __init__(self, arrays: dict, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                 drop_remainder: bool = True):
        super().__init__(batch_size, seed, shuffle, num_epochs, process_index, process_count, drop_remainder)
        arrays = {k: np.asarray(v) for k, v in rename_original_arrays(arrays).items()}
        missing = {"inputs_embeds", "labels", "attention_mask"} - set(arrays)
        if missing:
            raise InputError(f"window arrays lack {sorted(missing)} (have {sorted(arrays)})")
        n = len(arrays["inputs_embeds"])
        arrays.setdefault("window_index", np.arange(n, dtype=np.int64))
        if "prot_ids" not in arrays:  # the running gene counter, as the writer stores it
            mask = arrays["attention_mask"] != 0
            arrays["prot_ids"] = np.where(mask, np.cumsum(mask.reshape(-1)).reshape(mask.shape), 0)
        self.arrays = arrays
        self.num_windows = n
        self.examples_per_epoch = len(range(process_index, n, process_count))  # this host's share
        if self.examples_per_epoch == 0:
            raise InputError(f"host {process_index}/{process_count} has no windows (N = {n})")
        self._last_taken = 0

    @classmethod
    def from_npz(cls, path: str | pathlib.Path, batch_size: int, **kwargs) -> "InMemoryWindows":
        with np.load(path, allow_pickle=False) as f:
            return cls(dict(f), batch_size, **kwargs)

    def _fingerprint(self) -> dict:
        return {**super()._fingerprint(), "num_windows": self.num_windows}

    @property
    def epoch(self) -> int:
        return self._consumed // self.num_windows

    def _taken(self, batch: dict) -> int:
        return self._last_taken

    def _indices(self, consumed: int) -> Iterator[int]:
        epoch, offset = divmod(consumed, self.num_windows)
        while self.num_epochs is None or epoch < self.num_epochs:
            yield from self._epoch_order(epoch, self.num_windows)[offset:]
            epoch, offset = epoch + 1, 0

    def _batches(self, consumed: int) -> Iterator[dict]:
        indices, global_size = self._indices(consumed), self.batch_size * self.process_count
        while True:
            rows = np.fromiter(itertools.islice(indices, global_size), np.int64)
            if len(rows) == global_size:
                mine = rows[self.process_index * self.batch_size:(self.process_index + 1) * self.batch_size]
            elif self.drop_remainder:
                return
            else:  # the stream's last, smaller global batch: hosts' shares differ by at most one
                mine = rows[self.process_index::self.process_count]
            if len(mine) == 0:
                return
            self._last_taken = len(rows)
            yield {k: v[mine].astype(_OUT_DTYPES.get(k, v.dtype)) for k, v in self.arrays.items()}
