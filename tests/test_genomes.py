"""Genome readers on the real genomes of ../shared/data (counts from its README) and on malformed input."""
import csv
import gzip
import io
import json
import re
import warnings

import pytest
from Bio import SeqIO

from glm_jax.data import fasta, genomes
from glm_jax.data.genomes import GenomeFormatError, read_genome

ECOLI = "ecoli/GCF_000005845.2_ASM584v2_genomic.gbff.gz"


@pytest.fixture(scope="module")
def ecoli(shared_data):
    return read_genome(shared_data / ECOLI)


def test_ecoli_cds_pseudo_reported_and_order(ecoli, shared_data):
    assert len(ecoli.contigs) == 1 and ecoli.num_genes == 4298
    assert len(ecoli.skipped) == 17 and {s.reason for s in ecoli.skipped} == {"pseudo"}
    assert ecoli.summary()["skipped_by_reason"] == {"pseudo": 17}
    # every CDS row of operons.tsv (row = CDS ordinal, pseudo included): same coordinates, strand, id
    rows = list(csv.DictReader(open(shared_data / "ecoli/operons.tsv"), delimiter="\t"))
    assert len(rows) == 4315
    genes = {g.index: g for g in ecoli.contigs[0].genes}
    skipped = {s.index for s in ecoli.skipped}
    for row in rows:
        index = int(row["index"])
        if row["pseudo"] == "1":
            assert index in skipped
            continue
        gene = genes[index]
        assert (gene.id, gene.start, gene.end, gene.strand) == (
            row["protein_id"], int(row["start"]), int(row["end"]), 1 if row["strand"] == "+" else -1)
    # join() locations (dnaX, copA, prfB) are kept with their outer bounds
    joined = {g.label_dict["gene"] for g in ecoli.contigs[0].genes if g.label_dict.get("gene") in ("dnaX", "copA", "prfB")}
    assert joined == {"dnaX", "copA", "prfB"}


def test_ecoli_first_60_genes_are_the_reference_contigs(ecoli, shared_data):
    """contig_to_prots.tsv = CDS 1-30 and 31-60 with GenBank orientation; test.fa = their proteins."""
    table = genomes.read_contig_table(shared_data / "reference/contig_to_prots.tsv")
    reference = [entry for _, entries in table for entry in entries]
    first = ecoli.contigs[0].genes[:60]
    for (strand, pid), gene in zip(reference, first):
        match = re.fullmatch(r"lcl\|NC_000913\.3_prot_(.+)_(\d+)", pid)
        assert (match.group(1), int(match.group(2)), strand) == (gene.id, gene.index, gene.strand)
    proteins = {r.id: r.sequence for r in fasta.read_fasta(shared_data / "reference/test.fa")}
    assert [proteins[pid] for _, pid in reference] == [g.protein for g in first]


def test_protein_fasta_with_contig_table(shared_data):
    read = read_genome(shared_data / "reference/test.fa", contig_table=shared_data / "reference/contig_to_prots.tsv")
    assert [c.id for c in read.contigs] == ["contig_0", "contig_1"]
    assert [len(c.genes) for c in read.contigs] == [30, 30]
    assert read.contigs[0].genes[5].strand == -1 and read.contigs[0].genes[0].start is None


def test_yersinia_multirecord_contigs_do_not_cross_records(shared_data):
    path = shared_data / "genomes/Yersinia_pestis_KIM.gb.gz"
    read = read_genome(path)
    records = {r.id: r for r in SeqIO.parse(gzip.open(path, "rt"), "genbank")}
    assert len(read.contigs) == 6 and read.num_genes == 4785
    assert {c.id.split(".")[0] for c in read.contigs} == {"NC_004088", "NC_004839", "NC_004838", "NC_004837", "NC_004835", "NC_004836"}
    by_id = {c.id: c for c in read.contigs}
    assert len(by_id[next(k for k in by_id if k.startswith("NC_004088"))].genes) == 4330
    for contig in read.contigs:
        assert all(g.contig == contig.id and g.end <= len(records[contig.id].seq) for g in contig.genes)
        assert [g.start for g in contig.genes] == sorted(g.start for g in contig.genes)
    assert sum(g.label_dict.get("is_phage") == "1" for c in read.contigs for g in c.genes) == 163


@pytest.mark.parametrize("name, cds, phage", [("Streptococcus_pyogenes_M1_GAS.gb.gz", 1853, 184),
                                               ("Neisseria_meningitidis_MC58.gb.gz", 2553, 96)])
def test_phispy_genomes_is_phage_labels(shared_data, name, cds, phage):
    read = read_genome(shared_data / "genomes" / name)
    assert read.num_genes == cds and not read.skipped
    assert sum(g.label_dict.get("is_phage") == "1" for g in read.contigs[0].genes) == phage
    assert all(g.id.startswith("fig|") or g.id.startswith("RAST2:") for g in read.contigs[0].genes)


def test_pharokka_function_join_matches_tsv(shared_data):
    read = read_genome(shared_data / "genomes/pharokka_SAOMS1_MW460250_standard.gbk.gz")
    genes = read.contigs[0].genes
    assert len(genes) == 245 and all("*" not in g.protein for g in genes)
    rows = list(csv.DictReader(io.StringIO(gzip.open(shared_data / "genomes/pharokka_SAOMS1_MW460250_standard_cds_final_merged_output.tsv.gz", "rt").read()), delimiter="\t"))
    category = {r["gene"]: r["category"] for r in rows}
    assert all(g.label_dict["function"] == category[g.id] for g in genes)
    assert sum(g.label_dict["phrog"] == "No_PHROG" for g in genes) == 29
    meta = read_genome(shared_data / "genomes/pharokka_meta_5phages.gbk.gz")
    assert [len(c.genes) for c in meta.contigs] == [212, 63, 55, 103, 126]
    assert len({g.label_dict["function"] for c in meta.contigs for g in c.genes}) == 10


def _write_gff3(record, path, fasta_section=True):
    """A GFF3 of a GenBank record's CDS, one line per join() part, pseudo flagged."""
    lines = ["##gff-version 3"]
    for n, feature in enumerate((f for f in record.features if f.type == "CDS"), 1):
        q = feature.qualifiers
        attributes = f"ID=cds{n};locus_tag={q['locus_tag'][0]}"
        attributes += ";pseudo=true" if "pseudo" in q else f";protein_id={q['protein_id'][0]}"
        for part in feature.location.parts:
            strand = "+" if part.strand == 1 else "-"
            # phase 0 on the first part in transcription order; E. coli's joins are in-frame splices
            lines.append(f"{record.id}\tRefSeq\tCDS\t{int(part.start) + 1}\t{int(part.end)}\t.\t{strand}\t0\t{attributes}")
    text = "\n".join(lines) + "\n"
    fasta = f">{record.id}\n{record.seq}\n"
    if fasta_section:
        path.write_text(text + "##FASTA\n" + fasta)
    else:
        path.write_text(text)
        path.with_suffix(".fna").write_text(fasta)


def test_gff3_translation_matches_genbank(shared_data, tmp_path):
    record = next(SeqIO.parse(gzip.open(shared_data / ECOLI, "rt"), "genbank"))
    _write_gff3(record, tmp_path / "ecoli.gff3")
    gff = read_genome(tmp_path / "ecoli.gff3")
    genbank = {g.id: g for g in read_genome(shared_data / ECOLI).contigs[0].genes}
    by_reason = {}
    for s in gff.skipped:
        by_reason.setdefault(s.reason, []).append(s.id)
    assert len(by_reason["pseudo"]) == 17
    # selenocysteine (/transl_except, U in the GenBank translation) is an internal stop in a GFF
    assert sorted(by_reason["internal stop codon"]) == sorted(i for i, g in genbank.items() if "U" in g.protein)
    assert gff.num_genes == 4298 - len(by_reason["internal stop codon"])
    for gene in gff.contigs[0].genes:  # includes dnaX/prfB/copA, joined from two GFF lines
        ref = genbank[gene.id]
        assert (gene.protein, gene.start, gene.end, gene.strand) == (ref.protein, ref.start, ref.end, ref.strand)


def test_gff3_with_sibling_fasta(shared_data, tmp_path):
    record = next(SeqIO.parse(gzip.open(shared_data / "genomes/pharokka_SAOMS1_MW460250_standard.gbk.gz", "rt"), "genbank"))
    for feature in record.features:  # the helper wants RefSeq-like qualifiers
        feature.qualifiers.setdefault("protein_id", feature.qualifiers.get("locus_tag", ["?"]))
    _write_gff3(record, tmp_path / "phage.gff", fasta_section=False)
    read = read_genome(tmp_path / "phage.gff")
    assert read.num_genes == 245 and not read.skipped
    reference = read_genome(shared_data / "genomes/pharokka_SAOMS1_MW460250_standard.gbk.gz").contigs[0].genes
    # PHANOTATE's /translation keeps V/L for GTG/TTG starts; a translated start codon is always M
    assert [g.protein[1:] for g in read.contigs[0].genes] == [g.protein[1:] for g in reference]
    assert all(g.protein[0] == "M" for g in read.contigs[0].genes)


def test_nucleotide_fasta_gene_calling(shared_data, tmp_path):
    pytest.importorskip("pyrodigal")
    record = next(SeqIO.parse(gzip.open(shared_data / "genomes/pharokka_meta_5phages.gbk.gz", "rt"), "genbank"))
    (tmp_path / "phage.fna").write_text(f">{record.id}\n{record.seq}\n")
    read = read_genome(tmp_path / "phage.fna")
    called = {(g.start, g.end, g.strand) for g in read.contigs[0].genes}
    # Pharokka meta mode used Pyrodigal-gv on the same genome: most gene calls agree exactly
    pharokka = {(int(f.location.start) + 1, int(f.location.end), f.location.strand) for f in record.features if f.type == "CDS"}
    assert len(pharokka) == 212 and len(called & pharokka) >= 0.8 * len(pharokka)
    assert all(g.protein and "*" not in g.protein for g in read.contigs[0].genes)


def test_malformed_files_name_file_and_record(shared_data, tmp_path):
    text = gzip.open(shared_data / "genomes/pharokka_meta_5phages.gbk.gz", "rt").read()
    truncated = tmp_path / "truncated.gbk"
    truncated.write_text(text[: text.index("LOCUS", 1000) + 5000])
    with pytest.raises(GenomeFormatError, match=r"truncated\.gbk: malformed genbank record 2 \(after 'MW460250_1'\)"):
        read_genome(truncated)
    bad_location = tmp_path / "bad_location.gbk"
    bad_location.write_text(text.replace("complement(183..392)", "complement(183..x392)", 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(GenomeFormatError, match=r"bad_location\.gbk: record 'MW460250_1': CDS 1 has an unparseable location"):
            read_genome(bad_location)
    (tmp_path / "empty.gbk").write_text("")
    with pytest.raises(GenomeFormatError, match="empty.gbk: no genbank records"):
        read_genome(tmp_path / "empty.gbk")
    (tmp_path / "comment.faa").write_text("junk\n>a\nMKV\n")
    (tmp_path / "t.tsv").write_text("c1\t+a\n")
    with pytest.raises(fasta.FastaError, match="comment.faa: line 1: sequence data before the first '>' header"):
        read_genome(tmp_path / "comment.faa", contig_table=tmp_path / "t.tsv")
    (tmp_path / "table.tsv").write_text("c1\t+a;b\n")
    with pytest.raises(GenomeFormatError, match=r"table.tsv: line 1"):
        genomes.read_contig_table(tmp_path / "table.tsv")
    (tmp_path / "good.faa").write_text(">a\nMKV\n")
    (tmp_path / "table2.tsv").write_text("c1\t+a;-z\n")
    with pytest.raises(GenomeFormatError, match=r"contig 'c1' lists proteins not in .*good.faa: \['z'\]"):
        genomes.read_protein_fasta(tmp_path / "good.faa", tmp_path / "table2.tsv")
    (tmp_path / "gff.gff3").write_text("##gff-version 3\nchr\tx\tCDS\t1\t9\n")
    with pytest.raises(GenomeFormatError, match=r"gff.gff3: line 2: expected 9 tab-separated"):
        read_genome(tmp_path / "gff.gff3")
    (tmp_path / "protein.fna").write_text(">p\nMKVLLQERST\n")
    with pytest.raises(GenomeFormatError, match=r"protein.fna: record 'p' is not nucleotide"):
        read_genome(tmp_path / "protein.fna")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(GenomeFormatError, match="unknown genome format"):
        read_genome(tmp_path / "x.txt")


def test_summary_is_json_serialisable(ecoli):
    summary = ecoli.summary()
    assert json.loads(json.dumps(summary))["skipped_cds"] == 17
    assert summary["skipped_examples"][0].endswith("(pseudo)")
