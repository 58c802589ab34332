"""Commands of the paper's analyses: `operons fit|evaluate|predict`, `probe`, `hypotheses`,
`plot attention|embeddings`. Each parses its flags and calls glm_jax.analysis.

Genes come from an inference output directory (`--tables DIR`: genes.parquet [+ pairs.parquet],
written by `glm_jax.inference.genome.infer_genomes`) or from genome files (`--genome FILE ...`):
with `--checkpoint` the model is run on them first (into OUTPUT/inference); without, only the
model-free columns exist (coordinates, labels, and `esm2` when --store-dir/--esm2-dir is given).
"""
from __future__ import annotations

import argparse
import json
import pathlib

from glm_jax import files
from glm_jax.errors import InputError
from glm_jax.analysis import tables


def _source_arguments(parser: argparse.ArgumentParser, checkpoint_help: str = "run this gLM on the genomes") -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tables", help="inference output directory (genes.parquet, pairs.parquet)")
    source.add_argument("--genome", nargs="+", help="genome files (GenBank, GFF3, ...)")
    parser.add_argument("--checkpoint", help=f"model directory or training workdir: {checkpoint_help}")
    parser.add_argument("--esm2-dir", help="ESM2 model directory (default: the one `glm-jax fetch-esm2` caches)")
    parser.add_argument("--store-dir", help="ESM2 embedding store (reused, extended with missing proteins)")
    parser.add_argument("--feature-transform", help="normalisation (+ PCA) npz of the checkpoint's features "
                                                    "(default: the checkpoint's own)")
    parser.add_argument("--pca", help="sklearn PCA npz, when --feature-transform is the original's norm.npz")
    parser.add_argument("--window", type=int, default=30, help="genes per window when running the model")


def _feature_transform(args):
    from glm_jax.data.features import load_feature_transform

    return load_feature_transform(args.feature_transform, args.pca) if args.feature_transform else None


def _infer(args, output_dir: pathlib.Path, name: str, **options) -> tuple:
    """Runs the model on args.genome (the inference contract) and returns its tables."""
    from glm_jax.inference.genome import infer_genomes

    width, esm2_path = tables.esm2_width(args.esm2_dir)
    tables.check_feature_width(args.checkpoint, width, f"ESM2 at {esm2_path}")
    directory = infer_genomes(args.genome, args.checkpoint, output_dir / name, esm2_dir=args.esm2_dir,
                              store_dir=args.store_dir, feature_transform=_feature_transform(args),
                              include_esm2=True, progress=False, **options)
    return tables.read_tables(directory)


def _genes_and_pairs(args, output_dir: pathlib.Path, *, attention: bool = False, **options) -> tuple:
    """(genes, pairs or None) from --tables, or from --genome (+ --checkpoint)."""
    if args.tables:
        return tables.read_tables(args.tables)
    if args.checkpoint:
        options.setdefault("window", args.window)
        if attention:  # overlapping windows, so that every neighbouring pair shares a window
            options.update(attention="pairs", stride=max(1, options["window"] // 2))
        return _infer(args, output_dir, "inference", **options)
    genes = tables.genome_gene_table(args.genome)
    if args.store_dir or args.esm2_dir:
        genes = tables.attach_esm2(genes, args.store_dir or output_dir / "esm2_store", args.esm2_dir)
    return genes, None


# --- operons --------------------------------------------------------------------------------

def operons_main(argv) -> int:
    from glm_jax.analysis import labels as labels_lib
    from glm_jax.analysis import operons

    parser = argparse.ArgumentParser(prog="glm-jax operons", description="operon prediction from gLM attention")
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser("evaluate", help="cross-validated AP of attention features and baselines")
    fit = commands.add_parser("fit", help="fit a predictor on all labelled pairs")
    predict = commands.add_parser("predict", help="probability that each neighbouring pair shares an operon")
    for sub in (evaluate, fit, predict):
        _source_arguments(sub)
    for sub in (evaluate, fit):
        sub.add_argument("--labels", required=True, help="operon table (TSV: locus_tag, operon_id[, start, end])")
    evaluate.add_argument("--output", required=True, help="directory for operons.json, operons_pr.png, scores")
    evaluate.add_argument("--folds", type=int, default=5)
    evaluate.add_argument("--predictor", help="also score this fitted predictor as is (e.g. the original's "
                                              "operon_predictor.npz: coef_, intercept_)")
    evaluate.add_argument("--no-context-tables", help="inference output of the model on 2-gene windows "
                                                      "(the context-free ablation) when --tables is used")
    evaluate.add_argument("--skip-ablation", action="store_true", help="do not run the context-free ablation")
    fit.add_argument("--features", default="glm_attention", choices=("glm_attention", "distance_strand"))
    fit.add_argument("--output", required=True, help="predictor .npz")
    predict.add_argument("--predictor", required=True, help="predictor .npz (operons fit, or the original's)")
    predict.add_argument("--output", required=True, help="pair table (.tsv or .parquet)")
    args = parser.parse_args(argv)

    output = pathlib.Path(args.output)
    work_dir = output if args.command == "evaluate" else output.parent
    if args.command == "predict":
        feature_set = operons.load_predictor(args.predictor).feature_set
    else:  # evaluate scores every set the inputs allow
        feature_set = getattr(args, "features", "glm_attention")
    genes, pairs = _genes_and_pairs(args, work_dir, attention=feature_set != "distance_strand")
    if args.command == "evaluate":
        no_context = None
        if args.no_context_tables:
            no_context = tables.read_tables(args.no_context_tables)[1]
        elif args.checkpoint and not args.skip_ablation:
            no_context = _infer(args, work_dir, "inference_no_context", window=2, stride=1, attention="pairs")[1]
        predictor = operons.load_predictor(args.predictor) if args.predictor else None
        report, scores = operons.evaluate(genes, args.labels, attention_pairs=pairs, no_context_pairs=no_context,
                                          predictor=predictor, num_folds=args.folds)
        paths = operons.write_report(report, scores, output)
        for name, entry in report["feature_sets"].items():
            folds = " ".join(f"{ap:.3f}" for ap in entry["folds"])
            print(f"{name:<26} AP {entry['ap']:.4f}   folds {folds}")
        print(f"{report['pairs']} pairs, {report['positive_pairs']} in one operon; wrote {paths['report']}, {paths['plot']}")
        return 0

    pair_table = operons.join_attention(tables.adjacent_pairs(genes), pairs, "glm_attention")
    if args.command == "fit":
        y = labels_lib.operon_pair_labels(genes, pair_table, args.labels)
        features = operons.feature_sets(genes, pair_table)
        if args.features not in features:
            raise tables.TableError(f"no {args.features} features: pass --checkpoint (or --tables with pairs.parquet)")
        model = operons.fit_logistic(features[args.features], y, args.features)
        output.parent.mkdir(parents=True, exist_ok=True)
        model.save(output)
        print(f"fitted on {len(y)} pairs ({y.sum()} positive); training AP "
              f"{operons.average_precision(y, model.probabilities(features[args.features])):.4f}; wrote {output}")
        return 0
    model = operons.load_predictor(args.predictor)
    features = operons.feature_sets(genes, pair_table)
    if model.feature_set not in features:
        raise tables.TableError(f"the predictor uses {model.feature_set} features, which these tables lack")
    result = pair_table[["contig", "gene_id_a", "gene_id_b", "position_a", "distance", "same_strand"]].assign(
        probability=model.probabilities(features[model.feature_set]))
    _write_table(result, output)
    print(f"{len(result)} pairs, {(result['probability'] > 0.5).sum()} predicted in one operon; wrote {output}")
    return 0


def _write_table(table, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        files.atomic_write(path, lambda handle: table.to_parquet(handle, index=False))
    elif path.suffix in (".tsv", ".txt"):
        files.write_text_atomic(path, table.to_csv(sep="\t", index=False))
    else:
        raise InputError(f"{path}: output tables are .tsv or .parquet")


# --- probes ---------------------------------------------------------------------------------

def probe_main(argv) -> int:
    from glm_jax.analysis import labels as labels_lib
    from glm_jax.analysis import probes

    parser = argparse.ArgumentParser(prog="glm-jax probe", description="linear probes of gene labels, per layer, "
                                     "against the raw ESM2 embedding")
    _source_arguments(parser)
    parser.add_argument("--task", required=True, choices=labels_lib.PROBE_TASKS)
    parser.add_argument("--layers", type=int, nargs="*", default=(), help="hidden layers to store and probe")
    parser.add_argument("--group-by", choices=("contig", "genome"), help="keep a contig's/genome's genes in one fold")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--output", required=True, help="directory for probe_<task>.json and .tsv")
    args = parser.parse_args(argv)
    output = pathlib.Path(args.output)
    genes, _ = _genes_and_pairs(args, output, layers=tuple(args.layers))
    rows, y, classes = labels_lib.probe_labels(genes, args.task)
    groups = None
    if args.group_by:
        tables.require_columns(genes, (args.group_by,), "gene table")
        groups = genes[args.group_by].astype(str).to_numpy()
    result = probes.run_probes(genes, rows, y, classes, groups=groups, group_name=args.group_by or "group",
                               num_folds=args.folds, bootstrap=args.bootstrap)
    result["task"] = args.task
    table = probes.result_table(result)
    output.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(output / f"probe_{args.task}.json", json.dumps(result, indent=2) + "\n")
    _write_table(table, output / f"probe_{args.task}.tsv")
    print(f"{args.task}: {result['genes']} genes, {len(result['classes'])} classes, {result['folds']}")
    print(table.to_string(index=False))
    return 0


# --- hypotheses -----------------------------------------------------------------------------

def hypotheses_main(argv) -> int:
    from glm_jax.analysis import paralogs

    parser = argparse.ArgumentParser(prog="glm-jax hypotheses", description="top hypotheses of masked genes and the "
                                     "nearest real genes of the corpus in the label space")
    _source_arguments(parser, "run this gLM with each gene masked")
    parser.add_argument("--gene-id", action="append", help="masked gene(s) to report (default: all)")
    parser.add_argument("--top", type=int, default=None, help="hypotheses per gene (default: all)")
    parser.add_argument("--neighbours", type=int, default=5)
    parser.add_argument("--output", required=True, help="table (.tsv or .parquet)")
    args = parser.parse_args(argv)
    output = pathlib.Path(args.output)
    genes, _ = _genes_and_pairs(args, output.parent, hypotheses=True, context_only=True)
    table = paralogs.nearest_genes(genes, _feature_transform(args), gene_ids=args.gene_id, top_hypotheses=args.top,
                                   neighbours=args.neighbours)
    _write_table(table, output)
    print(f"{table['gene_id'].nunique()} genes, {len(table)} rows; wrote {output}")
    return 0


# --- plots ----------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _gene_name(genes, gene_id: str) -> str:
    """The gene's /gene name, else its locus_tag, else its id (genes indexed by gene_id)."""
    if gene_id in genes.index:
        for column in ("gene", "locus_tag"):
            if column in genes.columns and isinstance(genes.at[gene_id, column], str):
                return genes.at[gene_id, column]
    return gene_id


def _read_attention(path: pathlib.Path, index: int) -> tuple:
    """([layers, heads, genes, genes] attention of window `index`, its gene ids or None) from an
    inference output directory (maps/windows.parquet + maps/attention-*.npy, read memory-mapped)
    or an .npz with `attentions` [windows, layers, heads, genes, genes] and optional `gene_ids`."""
    import numpy as np
    import pandas as pd

    if path.is_dir():
        index_file = path / "maps" / "windows.parquet"
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file} not found: run inference with attention maps")
        windows = pd.read_parquet(index_file)
        match = windows[windows["window"] == index]
        if match.empty:
            raise InputError(f"{index_file}: no window {index} (windows {windows['window'].min()}.."
                             f"{windows['window'].max()})")
        entry = match.iloc[0]
        n = int(entry["num_genes"])
        maps = np.load(path / "maps" / entry["file"], mmap_mode="r")[int(entry["row"])][:, :, :n, :n]
        return np.asarray(maps, np.float32), [str(g) for g in entry["gene_ids"]]
    if not path.is_file():
        raise FileNotFoundError(f"attention file not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        if "attentions" not in f.files:
            raise InputError(f"{path}: no 'attentions' array (has {f.files})")
        if not 0 <= index < f["attentions"].shape[0]:
            raise InputError(f"{path}: --index {index} outside 0..{f['attentions'].shape[0] - 1}")
        gene_ids = [str(g) for g in f["gene_ids"][index]] if "gene_ids" in f.files else None
        return np.asarray(f["attentions"][index], np.float32), gene_ids


def plot_main(argv) -> int:
    import numpy as np

    from glm_jax.analysis import labels as labels_lib
    from glm_jax.analysis import plots

    parser = argparse.ArgumentParser(prog="glm-jax plot", description="attention maps and embedding maps")
    commands = parser.add_subparsers(dest="command", required=True)
    attention = commands.add_parser("attention", help="attention of one window: a head, a mean, or a grid")
    attention.add_argument("--attention", required=True, help="inference output directory with maps/, or an .npz "
                           "with attentions [windows, layers, heads, genes, genes] (forward's output) [+ gene_ids]")
    attention.add_argument("--index", type=int, default=0, help="window number (maps/windows.parquet), or npz row")
    attention.add_argument("--tables", help="gene table directory, to name genes (gene, else locus_tag)")
    attention.add_argument("--labels", help="operon table: outline operons (needs gene_ids and --tables)")
    attention.add_argument("--layer", type=int, help="one layer (default: mean over layers)")
    attention.add_argument("--head", type=int, help="one head (default: mean over heads)")
    attention.add_argument("--grid", action="store_true", help="a layers x heads grid instead of one map")
    attention.add_argument("--layers", type=_int_list, help="grid rows, e.g. 0,3,5 (default: all)")
    attention.add_argument("--heads", type=_int_list, help="grid columns (default: all)")
    attention.add_argument("--output", required=True, help=".png or .svg")
    embeddings = commands.add_parser("embeddings", help="2-D map of gene embeddings coloured by a label")
    embeddings.add_argument("--tables", required=True, help="inference output directory (genes.parquet)")
    embeddings.add_argument("--column", default="embedding", help="embedding, esm2 or layer_<i>")
    embeddings.add_argument("--color-by", default="function", help="a gene table column, or ec_class")
    embeddings.add_argument("--method", default="pca", choices=("pca", "umap"))
    embeddings.add_argument("--output", required=True, help=".png or .svg")
    args = parser.parse_args(argv)

    if args.command == "embeddings":
        genes, _ = tables.read_tables(args.tables)
        if args.color_by == "ec_class":
            rows, y, classes = labels_lib.probe_labels(genes, "ec_class")
            categories = np.full(len(genes), None, object)
            categories[rows] = [f"EC {classes[i]}" for i in y]
        else:
            tables.require_columns(genes, (args.color_by,), "gene table")
            categories = genes[args.color_by].to_numpy()
        plots.embedding_map(tables.stack(genes, args.column), categories, args.output, method=args.method,
                            title=f"{args.column} ({len(genes)} genes) by {args.color_by}")
        print(f"wrote {args.output}")
        return 0

    maps, gene_ids = _read_attention(pathlib.Path(args.attention), args.index)
    names, operon_ids = None, None
    if gene_ids is not None:
        keep = [i for i, g in enumerate(gene_ids) if g]  # padding has an empty id
        maps, gene_ids = maps[:, :, keep][:, :, :, keep], [gene_ids[i] for i in keep]
        names = gene_ids
        if args.tables:
            genes = tables.read_tables(args.tables)[0].set_index("gene_id")
            names = [_gene_name(genes, g) for g in gene_ids]
            if args.labels:
                operon_of = labels_lib.read_operon_table(args.labels).drop_duplicates("locus_tag")
                operon_of = dict(zip(operon_of["locus_tag"], operon_of["operon_id"]))
                tags = genes["locus_tag"] if "locus_tag" in genes.columns else {}
                operon_ids = [operon_of.get(tags.get(g), "") for g in gene_ids]
    elif args.labels:
        parser.error("--labels needs gene_ids in the attention file and --tables")
    title = f"{pathlib.Path(args.attention).name} window {args.index}"
    if args.grid:
        plots.attention_grid(maps, args.output, layers=args.layers, heads=args.heads, operon_ids=operon_ids, title=title)
    else:
        picked = maps[args.layer][None] if args.layer is not None else maps
        picked = picked[:, args.head][:, None] if args.head is not None else picked
        label = f"layer {'mean' if args.layer is None else args.layer}, head {'mean' if args.head is None else args.head}"
        plots.attention_map(picked.mean((0, 1)), args.output, names=names, operon_ids=operon_ids,
                            title=f"{title}: {label}")
    print(f"wrote {args.output}")
    return 0

