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

from glm_jax.analysis import tables


def _source_arguments(parser: argparse.ArgumentParser, checkpoint_help: str = "run this gLM on the genomes") -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tables", help="inference output directory (genes.parquet, pairs.parquet)")
    source.add_argument("--genome", nargs="+", help="genome files (GenBank, GFF3, ...)")
    parser.add_argument("--checkpoint", help=f"model directory or training workdir: {checkpoint_help}")
    parser.add_argument("--esm2-dir", help="ESM2 model directory (default: the one `glm-jax fetch-esm2` caches)")
    parser.add_argument("--store-dir", help="ESM2 embedding store (reused, extended with missing proteins)")
    parser.add_argument("--feature-transform", help="normalisation + PCA npz of the checkpoint's training data")
    parser.add_argument("--window", type=int, default=30, help="genes per window when running the model")


def _infer(args, output_dir: pathlib.Path, name: str, **options) -> tuple:
    """Runs the model on args.genome (the inference contract) and returns its tables."""
    from glm_jax.inference.genome import infer_genomes

    width, esm2_path = tables.esm2_width(args.esm2_dir)
    tables.check_feature_width(args.checkpoint, width, f"ESM2 at {esm2_path}")
    directory = infer_genomes(args.genome, args.checkpoint, output_dir / name, esm2_dir=args.esm2_dir,
                              store_dir=args.store_dir, feature_transform=args.feature_transform,
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
    fit.add_argument("--features", default="glm_attention", choices=operons.LEARNED_SETS)
    fit.add_argument("--output", required=True, help="predictor .npz")
    predict.add_argument("--predictor", required=True, help="predictor .npz (operons fit, or the original's)")
    predict.add_argument("--output", required=True, help="pair table (.tsv or .parquet)")
    args = parser.parse_args(argv)

    output = pathlib.Path(args.output)
    work_dir = output if args.command == "evaluate" else output.parent
    needs_attention = args.command == "evaluate" or getattr(args, "features", "") != "distance_strand"
    if args.command == "predict":
        needs_attention = operons.load_predictor(args.predictor).feature_set != "distance_strand"
    genes, pairs = _genes_and_pairs(args, work_dir, attention=needs_attention and bool(args.checkpoint))
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
        tables.write_atomic(path, lambda tmp: table.to_parquet(tmp, index=False))
    elif path.suffix in (".tsv", ".txt"):
        tables.write_atomic(path, lambda tmp: table.to_csv(tmp, sep="\t", index=False))
    else:
        raise ValueError(f"{path}: output tables are .tsv or .parquet")


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
    tables.write_atomic(output / f"probe_{args.task}.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    _write_table(table, output / f"probe_{args.task}.tsv")
    print(f"{args.task}: {result['genes']} genes, {len(result['classes'])} classes, {result['folds']}")
    print(table.to_string(index=False))
    return 0


# --- hypotheses -----------------------------------------------------------------------------

def hypotheses_main(argv) -> int:
    from glm_jax.analysis import paralogs
    from glm_jax.data.features import load_feature_transform

    parser = argparse.ArgumentParser(prog="glm-jax hypotheses", description="top hypotheses of masked genes and the "
                                     "nearest real genes of the corpus in the label space")
    _source_arguments(parser, "run this gLM with each gene masked")
    parser.add_argument("--pca", help="sklearn PCA npz, when --feature-transform is the original's norm.npz")
    parser.add_argument("--gene-id", action="append", help="masked gene(s) to report (default: all)")
    parser.add_argument("--top", type=int, default=None, help="hypotheses per gene (default: all)")
    parser.add_argument("--neighbours", type=int, default=5)
    parser.add_argument("--output", required=True, help="table (.tsv or .parquet)")
    args = parser.parse_args(argv)
    if not args.feature_transform:
        parser.error("--feature-transform is required: it places the corpus genes in the label space")
    output = pathlib.Path(args.output)
    genes, _ = _genes_and_pairs(args, output.parent, hypotheses=True)
    transform = load_feature_transform(args.feature_transform, args.pca)
    table = paralogs.nearest_genes(genes, transform, gene_ids=args.gene_id, top_hypotheses=args.top,
                                   neighbours=args.neighbours)
    _write_table(table, output)
    print(f"{table['gene_id'].nunique()} genes, {len(table)} rows; wrote {output}")
    return 0


# --- plots ----------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def plot_main(argv) -> int:
    import numpy as np

    from glm_jax.analysis import labels as labels_lib
    from glm_jax.analysis import plots

    parser = argparse.ArgumentParser(prog="glm-jax plot", description="attention maps and embedding maps")
    commands = parser.add_subparsers(dest="command", required=True)
    attention = commands.add_parser("attention", help="attention of one window: a head, a mean, or a grid")
    attention.add_argument("--attention", required=True, help=".npz with attentions [windows, layers, heads, genes, "
                                                              "genes] (glm-jax forward's output) and optional gene_ids")
    attention.add_argument("--index", type=int, default=0, help="window (row) of the npz")
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

    path = pathlib.Path(args.attention)
    if not path.is_file():
        raise FileNotFoundError(f"attention file not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        if "attentions" not in f.files:
            raise ValueError(f"{path}: no 'attentions' array (has {f.files})")
        if not 0 <= args.index < f["attentions"].shape[0]:
            raise ValueError(f"{path}: --index {args.index} outside 0..{f['attentions'].shape[0] - 1}")
        maps = np.asarray(f["attentions"][args.index], np.float32)  # [layers, heads, genes, genes]
        gene_ids = [str(g) for g in f["gene_ids"][args.index]] if "gene_ids" in f.files else None
    names, operon_ids = None, None
    if gene_ids is not None:
        keep = [i for i, g in enumerate(gene_ids) if g]  # padding has an empty id
        maps, gene_ids = maps[:, :, keep][:, :, :, keep], [gene_ids[i] for i in keep]
        names = gene_ids
        if args.tables:
            genes = tables.read_tables(args.tables)[0].set_index("gene_id")
            column = "gene" if "gene" in genes.columns else "locus_tag" if "locus_tag" in genes.columns else None
            names = [str(genes.at[g, column]) if column and g in genes.index else g for g in gene_ids]
            if args.labels:
                table = labels_lib.read_operon_table(args.labels).set_index("locus_tag")["operon_id"]
                operon_ids = [table.get(genes.at[g, "locus_tag"], "") if g in genes.index else "" for g in gene_ids]
    elif args.labels:
        parser.error("--labels needs gene_ids in the attention file and --tables")
    title = f"{path.name} window {args.index}"
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

