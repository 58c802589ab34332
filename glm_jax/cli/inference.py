"""`glm-jax forward` (the .npz batch contract), `glm-jax embed` (gene embeddings on shards) and
`glm-jax infer` (genomes -> per-gene gLM results, glm_jax.inference.genome)."""
from __future__ import annotations

import argparse

from glm_jax.cli import common
from glm_jax.progress import Progress


def forward_main(argv: list[str]) -> int:
    from glm_jax.inference import predict
    from glm_jax.model import objective
    parser = common.parser("forward", "run gLM on an .npz batch")
    common.add_model_run_arguments(parser)
    parser.add_argument("--input", required=True, help=".npz with inputs_embeds, attention_mask[, labels, masked_tokens]")
    parser.add_argument("--output", required=True, help=".npz to write")
    parser.add_argument("--label-clip", type=float, default=0.0,
                        help="clip labels to +-value before the loss; 0 (default) passes them as given, like "
                             "the original model's forward; its train.py clips at 10")
    parser.add_argument("--reduction", default="all_positions", choices=objective.REDUCTIONS)
    args = parser.parse_args(argv)
    output = common.output_file(args.output)
    batch = predict.read_npz(args.input)
    model = common.load_model(args)
    result = predict.forward(model, batch, batch_size=args.batch_size, label_clip=args.label_clip,
                             reduction=args.reduction, source=args.input)
    common.save_npz(output, result)
    summary = "".join(f", {k}={float(result[k]):.4f}" for k in ("loss", "pseudo_accuracy") if k in result)
    missing = [key for key in predict.OUTPUT_KEYS if key not in result]
    not_written = (f"; not written: {', '.join(missing)} (attention {model.config.attention!r} keeps no "
                   "probabilities; use --attention reference or xla_shifted)") if missing else ""
    print(f"wrote {output}: {result['last_hidden_state'].shape[0]} contigs{summary}; "
          f"arrays: {', '.join(key for key in predict.OUTPUT_KEYS if key in result)}{not_written}")
    return 0


def embed_main(argv: list[str]) -> int:
    from glm_jax.data.shards import ShardReader
    from glm_jax.inference import predict
    parser = common.parser("embed", "gene embeddings and predictions of a trained gLM on shards")
    common.add_model_run_arguments(parser)
    parser.add_argument("--shards", required=True, help="dataset directory written by make-shards (or shard files)")
    parser.add_argument("--split", default="eval", help="train or eval")
    parser.add_argument("--output", required=True, help=".npz to write")
    parser.add_argument("--all-layers", action="store_true", help="also write every layer's hidden state")
    common.add_progress_argument(parser)
    args = parser.parse_args(argv)
    output = common.output_file(args.output)
    reader = ShardReader(args.shards, batch_size=args.batch_size, split=args.split, shuffle=False, num_epochs=1,
                         drop_remainder=False, include_metadata=True)
    model = common.load_model(args)
    batches = Progress(reader, desc="embed", unit="batch", enabled=not args.no_progress)
    result = predict.embed_windows(model, batches, all_layers=args.all_layers,
                                   source=args.shards)
    common.save_npz(output, result)
    print(f"wrote {output}: {len(result['gene_ids'])} genes from "
          f"{len(set(result['contig_ids']))} windows, embeddings {result['embeddings'].shape}")
    return 0


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def infer_main(argv: list[str]) -> int:
    from glm_jax.inference import genome
    parser = common.parser(
        "infer", "Per-gene gLM results of genomes: OUTPUT/genes.parquet (one row per CDS), "
                 "OUTPUT/pairs.parquet (--attention pairs), OUTPUT/maps/ (--attention maps). Resumable: rerun "
                 "the same command after an interruption.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=genome.__doc__.split("\n\n", 2)[2])
    parser.add_argument("genomes", nargs="*", help=".gb/.gbk/.gbff, .gff/.gff3, .faa (+ --contig-table), "
                                                   ".fna/.fa (pyrodigal gene calls); .gz ok")
    common.add_model_run_arguments(parser, batch_help="windows per model call (all devices)", batch_size=32,
                                   attention_options=False)
    parser.add_argument("--output", required=True, help="output directory (created; reruns resume)")
    parser.add_argument("--shards", help="a make-shards directory instead of genome files (all splits)")
    parser.add_argument("--contig-table", help="contig<TAB>+id;-id;... table for protein FASTA inputs")
    parser.add_argument("--features", help="make-shards directory (or normalisation npz) of the model's training "
                                           "features; default: the checkpoint's (see docs/inference.md)")
    parser.add_argument("--normalization", help="mean/std npz, e.g. the reference norm.npz (with --pca)")
    parser.add_argument("--pca", help="sklearn-style PCA npz for --normalization, e.g. the reference pca.npz")
    parser.add_argument("--esm2-model", dest="esm2_dir", help="ESM2 model directory (default: the one the training "
                                                             "shards were made with, else the fetched ESM2-8M)")
    parser.add_argument("--store", help="ESM2 embedding store (default OUTPUT/embeddings)")
    parser.add_argument("--window", type=common.positive_int, default=30, help="genes per window")
    parser.add_argument("--stride", type=common.positive_int, help="gene offset between windows (default window/2)")
    parser.add_argument("--chunk-windows", type=common.positive_int, default=256, help="windows per resumable chunk")
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
    common.add_attention_arguments(parser, "--attention-impl", "reference", "reference")
    common.add_progress_argument(parser)
    common.add_distributed_arguments(parser)
    args = parser.parse_args(argv)
    common.output_dir(args.output)
    common.start_distributed(args)
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
    return 0
