"""`glm-jax infer`: genomes (or make-shards output) -> per-gene gLM results in parquet tables.

    infer_genomes([...], checkpoint, out_dir)  ->  out_dir/genes.parquet  (+ pairs.parquet, maps/)
    read_gene_table(out_dir)                   ->  pandas.DataFrame, one row per gene

Steps, with memory bounded by one contig and one chunk of windows, not by the corpus: a first
pass over the genomes counts genes and windows and collects the distinct proteins (plan.survey) ->
each distinct protein embedded once in the resumable ESM2 store -> a second pass plans the windows
contig by contig (plan.planned_windows) -> chunks of `chunk_windows` windows through the model,
data-parallel over the local devices (run.py) -> one table part per chunk -> the final tables
assembled part by part (tables.py).

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

Resume. Each finished chunk is a set of files in out_dir/parts (the genes part written last,
atomically: a chunk is done iff it exists). out_dir/manifest.json pins what the results depend on
(inputs, model, features, options); a rerun with the same settings computes only the chunks not
yet written, a rerun with other settings is refused. The final tables are assembled part by part
(one parquet row group each, so memory stays flat), written atomically, and the parts are deleted.

Several processes (--distributed). Every process reads the inputs and plans the same chunks;
chunk n is computed by process n % processes on that process's own devices, with no coordination
until all have finished; then process 0 writes the final tables. The result equals a 1-process
run row by row; after a process dies, the rerun computes only the chunks missing. The distinct
proteins are split the same way (by a hash of the sequence): each process embeds its share into its
own part of the store, and all wait until every part is written.

Attention maps (attention="maps"): out_dir/maps/attention-NNNNN.npy, float32
[windows_in_chunk, layers, heads, window, window] per chunk (padded positions included: slice
[:n, :n]), indexed by out_dir/maps/windows.parquet (window, file, row, contig, start, num_genes,
gene_ids). Plain .npy because np.load(mmap_mode="r") reads one window without loading the file,
the layout is the model's, and it needs no library beyond numpy; one file per chunk keeps resume
identical to the tables'.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import pathlib
import shutil
from typing import Callable, Sequence

import jax

from glm_jax import distributed
from glm_jax.data import genomes
from glm_jax.inference import inputs, plan, run, tables
from glm_jax.inference.inputs import resolve_features, training_data_dir  # noqa: F401  (public names)
from glm_jax.inference.options import ATTENTION_MODES, InferenceInputError, InferenceOptions  # noqa: F401
from glm_jax.inference.tables import (GENES_FILE, MANIFEST_FILE, MAPS_DIR, PAIRS_FILE, PARTS_DIR,  # noqa: F401
                                      WINDOWS_FILE, read_gene_table, read_pair_table)


def infer_genomes(genome_paths: Sequence[str | pathlib.Path], checkpoint: str | pathlib.Path,
                  output_dir: str | pathlib.Path, *, esm2_dir=None, store_dir=None, feature_transform=None,
                  window: int = 30, stride: int | None = None, batch_size: int = 32, layers: Sequence[int] = (),
                  hypotheses: bool = False, context_only: bool = False, attention: str | None = None,
                  include_esm2: bool = False, attention_impl: str = "reference", clip_distances: bool = False,
                  progress: bool = True,
                  contig_table=None, shards_dir=None, chunk_windows: int = 256, compute_dtype: str = "float32",
                  devices: Sequence[jax.Device] | None = None, log: Callable[[str], None] = print) -> pathlib.Path:
    """Per-gene gLM results of genomes (or of a make-shards directory, `shards_dir`) in
    `output_dir` (see the module docstring); returns `output_dir`. Resumable; in a run of several
    JAX processes (glm_jax.distributed) every process calls it with the same arguments.

    checkpoint: model directory or training workdir. feature_transform: see `resolve_features`.
    esm2_dir: default the one the training shards were made with, else `glm-jax fetch-esm2`'s.
    store_dir: ESM2 embedding store (default output_dir/embeddings). layers: hidden states to add
    as `layer_<i>` (0 = embedding output, num_layers = last). hypotheses: the num_pred hypotheses,
    their probabilities and the PCA label. context_only: each gene masked in turn (one model row
    per gene) -> context_embedding (+ context_hypotheses/probabilities). attention: "pairs" ->
    pairs.parquet, "maps" -> maps/. include_esm2: the raw ESM2 vector. devices: default this
    process's (jax.local_devices())."""
    out_dir = pathlib.Path(output_dir)
    model = run.load_checkpoint(checkpoint, attention_impl, clip_distances, compute_dtype)
    config = model.config
    options = InferenceOptions(window, stride, tuple(int(x) for x in layers), hypotheses, context_only, attention,
                               include_esm2, attention_impl, chunk_windows)
    options.check(config.num_layers, config.max_position_embeddings, config.clip_distances)
    process, processes = jax.process_index(), jax.process_count()
    if shards_dir is not None:
        source, featurize, survey, identity_inputs, feature_source = _shards_input(
            genome_paths, shards_dir, checkpoint, config, options)
    else:
        source, featurize, survey, identity_inputs, feature_source = _genomes_input(
            genome_paths, contig_table, checkpoint, config, options, feature_transform, esm2_dir,
            store_dir or out_dir / "embeddings", out_dir, progress, log)
    identity = {"inputs": identity_inputs, "model": tables.model_fingerprint(model), "compute_dtype": compute_dtype,
                "options": dataclasses.asdict(options), "windows": survey.windows, "genes": survey.genes}
    identity = json.loads(json.dumps(identity))  # as the manifest stores it (tuples become lists)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = tables.open_manifest(out_dir, identity, create=process == 0)
    if manifest["complete"] and (out_dir / GENES_FILE).is_file():
        log(f"{out_dir}: already complete")
        return out_dir
    for folder in (PARTS_DIR,) + ((MAPS_DIR,) if attention == "maps" else ()):
        (out_dir / folder).mkdir(exist_ok=True)

    mine = [n for n in range(survey.chunks) if n % processes == process]
    todo = [n for n in mine if not tables.chunk_done(out_dir, n)]
    devices = list(devices) if devices is not None else jax.local_devices()
    runner = run.ModelRunner(model, devices, batch_size, options)
    size = lambda n: min(options.chunk_windows, survey.windows - n * options.chunk_windows)  # noqa: E731
    log(f"{survey.genes} genes on {survey.contigs} contigs -> {survey.windows} windows of <= {options.window} "
        f"(stride {options.step}) in {survey.chunks} chunks ({len(mine)} for process {process} of {processes}), "
        f"{len(mine) - len(todo)} already done; {len(devices)} device(s), {runner.batch_size} windows per call; "
        f"features: {feature_source}")
    from glm_jax.progress import Progress
    with Progress(total=sum(map(size, mine)), initial=sum(map(size, set(mine) - set(todo))), unit="window",
                  desc="infer", enabled=progress) as bar:
        left = set(todo)
        for n, windows in plan.chunks(plan.planned_windows(source(), survey), options.chunk_windows) if left else ():
            if n in left:
                result = run.compute_chunk(n * options.chunk_windows, windows, featurize, runner, options,
                                           survey.label_keys)
                tables.write_chunk(out_dir, n, result)
                bar.update(len(windows))
                left.discard(n)
                if not left:
                    break
    record = {"computed_chunks": todo, "model_calls": runner.calls, "devices": len(devices)}
    if processes > 1:
        files_record = tables.run_record_file(out_dir, process)
        tables.save_record(files_record, {"process": process, "processes": processes, **record})
    distributed.barrier("infer-chunks-written")
    if process == 0:
        records = ([record] if processes == 1 else
                   [json.loads(tables.run_record_file(out_dir, p).read_text()) for p in range(processes)])
        _assemble(out_dir, survey, options, manifest, records, log)
    distributed.barrier("infer-tables-written")
    return out_dir


def _genomes_input(genome_paths, contig_table, checkpoint, config, options: InferenceOptions, feature_transform,
                   esm2_dir, store_dir, out_dir: pathlib.Path, progress: bool, log):
    """(window source, featurize, survey, manifest inputs, feature source) of genome files; every
    distinct protein is in the store when it returns (each process embeds its share)."""
    if not genome_paths:
        raise InferenceInputError("no genome files given")
    transform, feature_source, info = resolve_features(checkpoint, feature_transform)
    esm2_dir = pathlib.Path(esm2_dir) if esm2_dir else inputs.default_esm2_dir(info)
    esm_dim = inputs.esm2_dimension(esm2_dir)
    if transform.mean.shape[0] != esm_dim:
        raise InferenceInputError(f"{feature_source}: normalisation is {transform.mean.shape[0]}-d but the ESM2 "
                                  f"model {esm2_dir} gives {esm_dim}-d embeddings")
    if config.emb_dim != esm_dim + 1:
        raise InferenceInputError(f"{checkpoint}: emb_dim {config.emb_dim} (glm_config.json) does not fit the "
                                  f"ESM2 model {esm2_dir}: {esm_dim}-d embeddings + orientation = {esm_dim + 1}")
    if transform.num_pc != config.num_pc:
        raise InferenceInputError(f"{feature_source}: {transform.num_pc - 1} PCA components + orientation "
                                  f"!= the checkpoint's num_pc {config.num_pc} ({checkpoint})")

    def source(report=None):
        return plan.genome_windows(inputs.read_contigs(genome_paths, contig_table, report), options.window,
                                   options.step)

    process, processes = jax.process_index(), jax.process_count()
    report, genes_by_file = genomes.ReadReport(), collections.Counter()
    with inputs.protein_spill(out_dir, process, processes) as spill:
        def on_contig(contig):
            genes_by_file[contig.source] += len(contig.genes)
            for gene in contig.genes:
                spill.add(gene.protein)

        survey = plan.survey(source(report), options.chunk_windows, on_contig)
        inputs.check_every_file_has_genes(genome_paths, genes_by_file)
        log(f"read {survey.genes} genes on {survey.contigs} contigs from {len(genome_paths)} file(s); "
            f"skipped {report.skipped_cds} CDS {dict(report.skipped_by_reason)}")
        inputs.embed_distinct(spill.close(), esm2_dir, store_dir, info, process, processes, progress, log)
    shutil.rmtree(spill.directory)
    distributed.barrier("infer-proteins-embedded")
    store = inputs.open_store(store_dir)
    featurize = inputs.GenomeFeatures(functools.partial(inputs.open_store, store_dir), transform, options.window,
                                      info.get("dtype", "float16"))
    identity_inputs = {
        "genomes": [[pathlib.Path(p).name, tables.file_digest(pathlib.Path(p))] for p in genome_paths],
        "contig_table": tables.file_digest(pathlib.Path(contig_table)) if contig_table else None,
        "features": tables.transform_fingerprint(transform), "esm2": store.model["fingerprint"],
        "esm2_layer": store.model["layer"]}
    return source, featurize, survey, identity_inputs, feature_source


def _shards_input(genome_paths, shards_dir, checkpoint, config, options: InferenceOptions):
    """(window source, featurize, survey, manifest inputs, feature source) of a make-shards
    directory (its windows, held in memory)."""
    if genome_paths:
        raise InferenceInputError("give genome files or a shards directory, not both")
    if options.include_esm2:
        raise InferenceInputError(f"{shards_dir}: shards hold no raw ESM2 embeddings; drop --esm2")
    from glm_jax.data import shards
    info = shards.load_dataset_info(shards_dir)
    if info["emb_dim"] != config.emb_dim:
        raise InferenceInputError(f"{shards_dir}: emb_dim {info['emb_dim']} (dataset_info.json) differs from "
                                  f"the checkpoint's emb_dim {config.emb_dim} ({checkpoint})")
    windowed, arrays = plan.shard_windows(shards_dir)
    survey = plan.survey(windowed, options.chunk_windows)
    shard_files = sorted(pathlib.Path(shards_dir).glob("*.tfrecord"))
    identity_inputs = {"shards": {f.name: f.stat().st_size for f in shard_files}}
    return lambda: iter(windowed), inputs.ShardFeatures(arrays), survey, identity_inputs, str(shards_dir)


def _assemble(out_dir: pathlib.Path, survey: plan.Survey, options: InferenceOptions, manifest: dict,
              records: list[dict], log) -> None:
    """The final tables from every chunk's parts (all written by now), then the manifest."""
    missing = [n for n in range(survey.chunks) if not tables.chunk_done(out_dir, n)]
    if missing:  # a process returned without an error but left chunks undone: never expected
        raise RuntimeError(f"{out_dir}: chunks {missing[:10]} missing after every process finished")
    manifest["runs"] += records
    tables.save_manifest(out_dir, manifest)
    tables.concatenate_parts([tables.part(out_dir, "genes", n) for n in range(survey.chunks)], out_dir / GENES_FILE)
    summary = {"genes": survey.genes, "windows": survey.windows, "contigs": survey.contigs}
    if options.attention == "pairs":
        summary["pairs"] = tables.assemble_pairs(out_dir, survey.chunk_starts, out_dir / PAIRS_FILE)
    if options.attention == "maps":
        tables.concatenate_parts([tables.part(out_dir, "windows", n) for n in range(survey.chunks)],
                                 out_dir / MAPS_DIR / WINDOWS_FILE)
    manifest.update(complete=True, summary=summary)
    tables.save_manifest(out_dir, manifest)
    tables.remove_parts(out_dir)
    log(f"wrote {out_dir / GENES_FILE}: {summary}")
