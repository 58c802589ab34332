"""The one FASTA reader and its protein rule (glm_jax/data/fasta.py), and the readers that use it."""
import gzip

import pytest

from glm_jax.data import fasta, genomes
from glm_jax.proteins import embed as protein_embed


def test_reads_plain_and_gzip_records_in_order(tmp_path):
    path = tmp_path / "ok.fa.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(">a some description\nmkv\nLL*\n\n>b\nAAA\n")
    records = fasta.read_fasta(path)
    assert [(r.id, r.description, r.sequence, r.line) for r in records] == [
        ("a", "a some description", "MKVLL", 1), ("b", "b", "AAA", 5)]


@pytest.mark.parametrize("text, message", [
    ("MKV\n>a\nMKV\n", r"bad\.fa: line 1: sequence data before the first '>' header"),
    (">a\nMKV\n>\nMKV\n", r"bad\.fa: line 3: header without a name"),
    (">a\nMKV\n>b\n*\n>c\nMK\n", r"bad\.fa: record 'b' \(line 3\): empty sequence"),
    (">a\nMKV\n>a\nMKV\n", r"bad\.fa: record 'a' \(line 3\): duplicate id"),
    ("", r"bad\.fa: no FASTA records"),
    (">a\nMKV\n>b\nMK12%V\n", r"bad\.fa: record 'b' \(line 3\): invalid residue '1' at position 3 \(all invalid: '%12'\)"),
    (">a\nMK*V\n", r"record 'a' \(line 1\): invalid residue '\*' at position 3"),
    (">a\nMKJV\n", r"invalid residue 'J' at position 3"),
])
def test_malformed_files_name_file_record_and_position(tmp_path, text, message):
    (tmp_path / "bad.fa").write_text(text)
    with pytest.raises(fasta.FastaError, match=message):
        fasta.read_fasta(tmp_path / "bad.fa")


def test_truncated_gzip_is_an_error_naming_the_file(tmp_path):
    data = gzip.compress(b">a\n" + b"MKV" * 1000 + b"\n")
    (tmp_path / "cut.fa.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(fasta.FastaError, match=r"cut\.fa\.gz: cannot read as FASTA"):
        fasta.read_fasta(tmp_path / "cut.fa.gz")
    (tmp_path / "bad.fa.gz").write_bytes(b"not gzip")
    with pytest.raises(fasta.FastaError, match=r"bad\.fa\.gz: cannot read as FASTA"):
        fasta.read_fasta(tmp_path / "bad.fa.gz")


def test_unknown_residues_map_to_x_only_when_asked(tmp_path):
    (tmp_path / "odd.faa").write_text(">a\nMK12%V*\n>b\nM*KV\n")
    assert [r.sequence for r in fasta.read_fasta(tmp_path / "odd.faa", unknown="x")] == ["MKXXXV", "MXKV"]
    assert set(fasta.PROTEIN_ALPHABET) == set("ACDEFGHIKLMNPQRSTVWYXBUZO")


def test_nucleotide_mode_keeps_letters_unchecked(tmp_path):
    (tmp_path / "dna.fna").write_text(">chr1\nacgt\nNNAC\n")
    assert fasta.read_fasta(tmp_path / "dna.fna", protein=False)[0].sequence == "ACGTNNAC"


def test_genome_readers_and_embedding_follow_the_same_rule(tmp_path):
    """Protein FASTA through read_genome, and proteins given to embed_proteins, are checked by the
    same rule (the issue: embed-proteins embedded 'MK1%V' without a word)."""
    (tmp_path / "p.faa").write_text(">a\nMKV\n>b\nMK1%V\n")
    (tmp_path / "t.tsv").write_text("c1\t+a;-b\n")
    with pytest.raises(fasta.FastaError, match=r"p\.faa: record 'b' \(line 3\): invalid residue '1' at position 3"):
        genomes.read_genome(tmp_path / "p.faa", contig_table=tmp_path / "t.tsv")
    read = genomes.read_genome(tmp_path / "p.faa", contig_table=tmp_path / "t.tsv", unknown="x")
    assert [g.protein for g in read.contigs[0].genes] == ["MKV", "MKXXV"]
    with pytest.raises(fasta.FastaError, match=r"protein 1 of the input: invalid residue '1' at position 3"):
        protein_embed.embed_proteins(["MKV", "MK1%V"], tmp_path / "store", tmp_path / "no-model", progress=False)
