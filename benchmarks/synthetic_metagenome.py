"""A synthetic metagenome for the data-pipeline benchmark, written as a stream (never held).

    python benchmarks/synthetic_metagenome.py OUT_DIR --genes 100000 [--format faa|gbk] [--seed 0]

Formats:
  faa   OUT_DIR/proteins.faa + OUT_DIR/contig_to_prots.tsv: the original gLM's protein FASTA and
        contig table (`contig<TAB>+id;-id;...`), proteins in table order as its files are
  gbk   OUT_DIR/metagenome.gbk: one GenBank record per contig, a CDS per gene with /translation and
        /protein_id, coordinates of genes laid end to end (the record carries no nucleotides)

Shape of the corpus (the defaults):
  genes per contig   1 + lognormal(log 14, 0.9), at most 400: median 15, mean ~21; about half the
                     contigs are shorter than a 30-gene window's minimum of 16 genes and drop out,
                     as short metagenomic contigs do
  protein lengths    uniform 30-120 residues (the size the issue's measurement used, so ESM2's cost
                     stays small next to the pipeline's); --lengths 100-600 for longer ones
  repeats            a third of the genes repeat a protein drawn from the last 4,096 distinct ones
                     (paralogs and strain variants shared between contigs)
The same seed and sizes give the same files.
"""
from __future__ import annotations

import argparse
import collections
import pathlib

import numpy as np

AMINO_ACIDS = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
# background amino-acid frequencies (UniProt), so tokens look like proteins
FREQUENCIES = np.array([8.25, 1.38, 5.46, 6.72, 3.86, 7.07, 2.27, 5.92, 5.81, 9.65, 2.41, 4.06, 4.73, 3.93,
                        5.53, 6.63, 5.35, 6.86, 1.10, 2.92])
FREQUENCIES = FREQUENCIES / FREQUENCIES.sum()
RECENT_POOL = 4096


def contigs(genes: int, seed: int = 0, lengths: tuple[int, int] = (30, 120), repeat_fraction: float = 1 / 3,
            median_genes: float = 14.0, sigma: float = 0.9, max_genes: int = 400):
    """Yields (contig id, [(strand, protein id, sequence), ...]) until `genes` genes are made."""
    rng = np.random.default_rng(seed)
    recent: collections.deque[str] = collections.deque(maxlen=RECENT_POOL)
    made = number = 0
    while made < genes:
        n = min(genes - made, max_genes, 1 + int(rng.lognormal(np.log(median_genes), sigma)))
        contig = f"contig_{number:08d}"
        entries = []
        for j in range(n):
            if recent and rng.random() < repeat_fraction:
                sequence = recent[int(rng.integers(len(recent)))]
            else:
                length = int(rng.integers(lengths[0], lengths[1] + 1))
                sequence = "M" + "".join(rng.choice(AMINO_ACIDS, length - 1, p=FREQUENCIES))
                recent.append(sequence)
            entries.append((1 if rng.random() < 0.5 else -1, f"{contig}_{j + 1}", sequence))
        yield contig, entries
        made, number = made + n, number + 1


def write_faa(out_dir: pathlib.Path, genes: int, seed: int = 0, **shape) -> tuple[pathlib.Path, pathlib.Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    faa, table = out_dir / "proteins.faa", out_dir / "contig_to_prots.tsv"
    with open(faa, "w") as proteins, open(table, "w") as rows:
        for contig, entries in contigs(genes, seed, **shape):
            for _, pid, sequence in entries:
                proteins.write(f">{pid}\n{sequence}\n")
            rows.write(contig + "\t" + ";".join(("+" if s > 0 else "-") + pid for s, pid, _ in entries) + "\n")
    return faa, table


def write_gbk(out_dir: pathlib.Path, genes: int, seed: int = 0, **shape) -> pathlib.Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metagenome.gbk"
    with open(path, "w") as handle:
        for contig, entries in contigs(genes, seed, **shape):
            lines, position = [], 1
            for strand, pid, sequence in entries:
                end = position + 3 * (len(sequence) + 1) - 1
                location = f"{position}..{end}" if strand > 0 else f"complement({position}..{end})"
                lines.append(f"     CDS             {location}\n"
                             f"                     /protein_id=\"{pid}\"\n"
                             f"                     /translation=\"{sequence}\"\n")
                position = end + 31
            handle.write(f"LOCUS       {contig:<16} {position:>11} bp    DNA     linear   ENV 01-JAN-2026\n"
                         f"DEFINITION  synthetic contig.\nACCESSION   {contig}\nVERSION     {contig}\n"
                         f"FEATURES             Location/Qualifiers\n"
                         f"     source          1..{position}\n" + "".join(lines) + "ORIGIN\n//\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--genes", type=int, required=True)
    parser.add_argument("--format", choices=("faa", "gbk"), default="faa")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lengths", default="30-120", help="protein lengths, MIN-MAX residues")
    args = parser.parse_args(argv)
    lengths = tuple(int(x) for x in args.lengths.split("-"))
    if args.format == "faa":
        print(*write_faa(args.out_dir, args.genes, args.seed, lengths=lengths))
    else:
        print(write_gbk(args.out_dir, args.genes, args.seed, lengths=lengths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
