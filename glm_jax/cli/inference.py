"""`glm-jax infer`: genomes -> per-gene gLM results (glm_jax.inference.genome)."""
from __future__ import annotations

import argparse
import sys


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def infer_main(argv: list[str]) -> int:
    from glm_jax.inference import genome
    parser = argparse.ArgumentParser(
        prog="glm-jax infer", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per-gene gLM results of genomes: OUTPUT/genes.parquet (one row per CDS), "
                    "OUTPUT/pairs.parquet (--attention pairs), OUTPUT/maps/ (--attention maps). Resumable: rerun "
                    "the same command after an interruption.",
        epilog=genome.__doc__.split("\n\n", 2)[2])
    parser.add_argument("genomes", nargs="*", help=".gb/.gbk/.gbff, .gff/.gff3, .faa (+ --contig-table), "
                                                   ".fna/.fa (pyrodigal gene calls); .gz ok")
    parser.add_argument("--checkpoint", required=True, help="model directory or training workdir")
    parser.add_argument("--output", required=True, help="output directory (created; reruns resume)")
    parser.add_argument("--shards", help="a make-shards directory instead of genome files (all splits)")
    parser.add_argument("--contig-table", help="contig<TAB>+id;-id;... table for protein FASTA inputs")
    parser.add_argument("--features", help="make-shards directory (or normalisation npz) of the model's training "
                                           "features; default: the checkpoint's (see README)")
    parser.add_argument("--normalization", help="mean/std npz, e.g. the reference norm.npz (with --pca)")
    parser.add_argument("--pca", help="sklearn-style PCA npz for --normalization, e.g. the reference pca.npz")
    parser.add_argument("--esm2-model", dest="esm2_dir", help="ESM2 model directory (default: the one the training "
                                                             "shards were made with, else the fetched ESM2-8M)")
    parser.add_argument("--store", help="ESM2 embedding store (default OUTPUT/embeddings)")
    parser.add_argument("--window", type=_positive, default=30, help="genes per window")
    parser.add_argument("--stride", type=_positive, help="gene offset between windows (default window/2)")
    parser.add_argument("--batch-size", type=_positive, default=32, help="windows per model call (all devices)")
    parser.add_argument("--chunk-windows", type=_positive, default=256, help="windows per resumable chunk")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="compute dtype")
    parser.add_argument("--layers", type=_layers, default=(), help="hidden states to add, e.g. 0,5,19 "
                                                                   "(0: embedding output, last: = embedding)")
    parser.add_argument("--hypotheses", action="store_true",
                        help="add the hypotheses, their probabilities and the PCA label of each gene")
    parser.add_argument("--context-only", action="store_true",
                        help="also run each gene masked: context_embedding (what the context predicts)")
    parser.add_argument("--attention", choices=("pairs", "maps"), help="pairs: adjacent-pair attention features; "
                                                                        "maps: whole per-window attention")
    parser.add_argument("--esm2", dest="include_esm2", action="store_true",
                        help="add the raw mean-pooled ESM2 embedding of each gene (column esm2)")
    from glm_jax import kernels
    parser.add_argument("--attention-impl", default="reference", choices=tuple(kernels.IMPLEMENTATIONS),
                        help="attention implementation (only reference and xla_shifted keep attention maps)")
    parser.add_argument("--clip-distances", action="store_true",
                        help="gene distances beyond the model's max_position_embeddings - 1 use the distance "
                             "table's end rows (Shaw et al. 2018), so windows of any length run")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        transform = args.features
        if args.normalization:
            if args.features:
                raise genome.InferenceInputError("give --features or --normalization, not both")
            from glm_jax.data import features
            transform = features.load_feature_transform(args.normalization, args.pca)
        genome.infer_genomes(
            args.genomes, args.checkpoint, args.output, esm2_dir=args.esm2_dir, store_dir=args.store,
            feature_transform=transform, window=args.window, stride=args.stride, batch_size=args.batch_size,
            layers=args.layers, hypotheses=args.hypotheses, context_only=args.context_only,
            attention=args.attention, include_esm2=args.include_esm2, attention_impl=args.attention_impl,
            clip_distances=args.clip_distances, progress=not args.no_progress, contig_table=args.contig_table,
            shards_dir=args.shards, chunk_windows=args.chunk_windows, compute_dtype=args.dtype)
    except (ValueError, FileNotFoundError) as error:
        print(f"glm-jax infer: error: {error}", file=sys.stderr)
        return 1
    return 0
