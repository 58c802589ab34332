"""What `infer` feeds the model: contigs streamed from genome files, their distinct proteins in
the ESM2 embedding store, and the checkpoint's training features applied to each chunk's windows."""
from __future__ import annotations

import contextlib
import json
import pathlib
import shutil
from typing import Callable, Iterator, Sequence

import numpy as np

from glm_jax.data import features, genomes, protein_set
from glm_jax.inference.options import InferenceInputError
from glm_jax.inference.plan import PlannedWindow


# --- contigs and proteins ------------------------------------------------------------------------

def read_contigs(genome_paths: Sequence[str | pathlib.Path], contig_table=None,
                 report: genomes.ReadReport | None = None) -> Iterator[genomes.Contig]:
    """The contigs with genes of every file, one record at a time, in input order
    (`genomes.iter_contigs`: a contig id repeated across inputs is an error; `report` counts what
    was read and skipped)."""
    for contig in genomes.iter_contigs(genome_paths, contig_table, report=report):
        if contig.genes:
            yield contig


def check_every_file_has_genes(genome_paths: Sequence[str | pathlib.Path], genes_by_file: dict[str, int]) -> None:
    """A file without a single protein-coding gene is an error (`genes_by_file`: by file name)."""
    for path in genome_paths:
        if not genes_by_file.get(pathlib.Path(path).name):
            raise InferenceInputError(f"{path}: no CDS with a protein sequence; nothing to infer")


@contextlib.contextmanager
def protein_spill(out_dir: pathlib.Path, process: int, processes: int) -> Iterator[protein_set.ProteinSpill]:
    """The distinct proteins of this process's share (hash partitions q % processes == process),
    spilled under out_dir (glm_jax.data.protein_set: memory holds one buffer, not the corpus).
    On an error the spill, and out_dir when this run created it and left it empty, are removed:
    bad input leaves nothing behind."""
    created = not out_dir.exists()
    directory = out_dir / f".proteins-p{process:05d}"
    try:
        yield protein_set.ProteinSpill(directory, owned=lambda q: q % processes == process)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise


def embed_distinct(proteins: protein_set.ProteinSet, esm2_dir, store_dir, info: dict, process: int,
                   processes: int, progress: bool, log):
    """This process's share of the distinct proteins in its own part of the ESM2 store
    (resumable; at the layer the training shards used)."""
    from glm_jax.proteins import embed as protein_embed
    layer = info.get("esm2", {}).get("layer")
    store = protein_embed.embed_proteins(proteins, store_dir, esm2_dir, layer=layer, progress=progress,
                                         writer=f"p{process:05d}")
    run = store.last_run
    share = f" (process {process}'s share of {processes})" if processes > 1 else ""
    log(f"ESM2: {run.unique} distinct proteins{share}, {run.already_stored} already in {store_dir}, "
        f"{run.embedded} embedded")
    return store


def open_store(store_dir):
    """The store with every writer's part (read only)."""
    from glm_jax.proteins import embed as protein_embed
    return protein_embed.EmbeddingStore(store_dir)


# --- features of windows ---------------------------------------------------------------------------

class GenomeFeatures:
    """Model inputs of planned windows from the embedding store and the feature transform.

    Features are rounded to `dtype` (float16 unless the training shards say otherwise) before the
    model, as make-shards stores them, so a window gives what training and `embed` saw.

    The store is opened per call (`open_store()`: a few small files), so rows other processes
    committed since are seen; its reads are `pread`s of the rows asked for, so a chunk's lookup
    costs memory for those rows only."""

    def __init__(self, open_store: Callable, transform: features.FeatureTransform, window: int,
                 dtype: str = "float16"):
        self.open_store, self.transform, self.window, self.dtype = open_store, transform, window, np.dtype(dtype)

    def __call__(self, windows: Sequence[PlannedWindow]) -> dict[str, np.ndarray]:
        """-> inputs_embeds [n, S, E] float32, labels [n, S, K] float32, attention_mask [n, S] int32,
        esm2 [n, S, D] float32 (the raw embeddings, pad rows 0)."""
        genes = [w.genes for w in windows]
        proteins = list(dict.fromkeys(g.protein for window in genes for g in window))
        row_of = {p: i for i, p in enumerate(proteins)}
        rows = np.full((len(windows), self.window), -1, np.int64)
        strands = np.zeros((len(windows), self.window), np.int64)
        for i, window in enumerate(genes):
            rows[i, :len(window)] = [row_of[g.protein] for g in window]
            strands[i, :len(window)] = [g.strand for g in window]
        embeddings = self.open_store().get(proteins)
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


# --- the checkpoint's features and ESM2 --------------------------------------------------------------

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


def esm2_dimension(model_dir: pathlib.Path) -> int:
    config_file = pathlib.Path(model_dir) / "config.json"
    if config_file.is_file():
        return int(json.loads(config_file.read_text())["hidden_size"])
    from glm_jax.proteins import esm2
    return esm2.load_esm2(model_dir)[0].hidden_size


def default_esm2_dir(info: dict) -> pathlib.Path:
    """The ESM2 model the training shards were made with when it is still there, else the fetched one."""
    from glm_jax.proteins import embed as protein_embed
    trained_with = info.get("esm2", {}).get("model_dir")
    if trained_with and pathlib.Path(trained_with).exists():
        return pathlib.Path(trained_with)
    return protein_embed.default_esm2_dir()
