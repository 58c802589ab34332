"""Genome readers: GenBank, GFF3 + FASTA, protein FASTA + contig table, nucleotide FASTA.

Streaming: `iter_contigs(paths, contig_table, unknown, report)` yields one `Contig` at a time, in
input order, and counts what it read and skipped into a `ReadReport`; memory is one GenBank record,
one GFF3 / nucleotide FASTA file (they need the whole file), or, for protein FASTA + contig table,
the proteins read ahead of the table (none when the FASTA lists them in table order, as the
original's files do). Contig ids must be unique over all inputs (checked by 64-bit hash). The
`read_*` functions below return whole files for small inputs and tests.

Every reader returns a `GenomeRead`: per contig the genes in genomic order (`Gene`: id, protein
sequence, strand +-1, 1-based inclusive start/end, contig id, label qualifiers) plus the CDS it
had to skip (`SkippedCDS`: pseudogenes, CDS without a translation, ...), so nothing is dropped
silently. A contig never crosses a record: each GenBank record / FASTA sequence is its own contig.

Formats (chosen by file name, `.gz` allowed on all):
  .gb .gbk .gbff .genbank    GenBank; proteins from /translation
  .gff .gff3                 GFF3; sequences from its ##FASTA section or a sibling .fna/.fa/.fasta
                             file, CDS translated with the feature's transl_table (default 11)
  .faa (+ contig table)      protein FASTA + `contig<TAB>+id;-id;...` (the original's contig_to_prots.tsv)
  .fna .fa .fasta .fas       nucleotide FASTA, genes called with pyrodigal (optional dependency);
                             .fa/.fasta/.fas whose first sequence is protein are protein FASTA
Malformed input raises `GenomeFormatError` (FASTA: `fasta.FastaError`) naming the file and the record.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import pathlib
import urllib.parse
from collections import Counter
from typing import Callable, Iterable, Iterator, Sequence

from Bio import SeqIO
from Bio.Data import CodonTable
from Bio.Seq import Seq

from glm_jax.data import fasta, id_hashes
from glm_jax.errors import InputError

GENBANK_SUFFIXES = (".gb", ".gbk", ".gbff", ".genbank")
GFF_SUFFIXES = (".gff", ".gff3")
PROTEIN_FASTA_SUFFIXES = (".faa",)
NUCLEOTIDE_FASTA_SUFFIXES = (".fna", ".fa", ".fasta", ".fas")
AMBIGUOUS_FASTA_SUFFIXES = (".fa", ".fasta", ".fas")  # sniffed: protein or nucleotide
NUCLEOTIDE_LETTERS = frozenset("ACGTUNRYKMSWBDHV")
# GenBank qualifiers kept as per-gene labels (PhiSpy's prophage label, Pharokka's PHROG annotations,
# NCBI identifiers and EC numbers for function probes).
LABEL_QUALIFIERS = ("is_phage", "phrog", "function", "product", "locus_tag", "gene", "protein_id", "EC_number")
# Qualifiers whose repeats are all kept, joined: Pharokka splits a category containing a comma over
# two /function qualifiers; an enzyme may carry several /EC_number.
REPEATED_QUALIFIER_JOINERS = {"function": ", ", "EC_number": ";"}


class GenomeFormatError(InputError):
    """A genome file that cannot be read; the message names the file and the record."""


@dataclasses.dataclass(frozen=True)
class Gene:
    """One protein-coding gene. `start`/`end` are 1-based inclusive (outer bounds of a join), or
    None when the input has no coordinates (protein FASTA). `index` is the 1-based CDS ordinal in
    its file (pseudo CDS counted), the key of row-wise annotation tables such as gLM's operon.annot."""
    id: str
    protein: str
    strand: int
    start: int | None
    end: int | None
    contig: str
    index: int = 0
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


@dataclasses.dataclass(frozen=True)
class Contig:
    """A contig's genes in genomic order; `source` is the file it came from."""
    id: str
    source: str
    genes: tuple[Gene, ...]


@dataclasses.dataclass(frozen=True)
class SkippedCDS:
    """A CDS that was not turned into a gene, and why (e.g. "pseudo", "no translation")."""
    source: str
    contig: str
    index: int
    id: str
    location: str
    reason: str


@dataclasses.dataclass
class GenomeRead:
    contigs: list[Contig] = dataclasses.field(default_factory=list)
    skipped: list[SkippedCDS] = dataclasses.field(default_factory=list)

    def extend(self, other: "GenomeRead") -> "GenomeRead":
        self.contigs += other.contigs
        self.skipped += other.skipped
        return self

    @property
    def num_genes(self) -> int:
        return sum(len(c.genes) for c in self.contigs)

    def summary(self) -> dict:
        """Counts for logs and dataset_info.json; `skipped_examples` lists the first 20 skipped CDS."""
        return {
            "files": len({c.source for c in self.contigs} | {s.source for s in self.skipped}),
            "contigs": len(self.contigs),
            "genes": self.num_genes,
            "skipped_cds": len(self.skipped),
            "skipped_by_reason": dict(Counter(s.reason for s in self.skipped)),
            "skipped_examples": [f"{s.source}:{s.contig}:{s.id or s.index} {s.location} ({s.reason})"
                                 for s in self.skipped[:20]],
        }


@dataclasses.dataclass
class ReadReport:
    """What a streaming read saw: counts, skipped CDS by reason and the first 20 of them."""
    files: int = 0
    contigs: int = 0
    genes: int = 0
    skipped_cds: int = 0
    skipped_by_reason: Counter = dataclasses.field(default_factory=Counter)
    skipped_examples: list[str] = dataclasses.field(default_factory=list)

    def add_contig(self, contig: Contig) -> None:
        self.contigs += 1
        self.genes += len(contig.genes)

    def add_skipped(self, skipped: SkippedCDS) -> None:
        self.skipped_cds += 1
        self.skipped_by_reason[skipped.reason] += 1
        if len(self.skipped_examples) < 20:
            self.skipped_examples.append(f"{skipped.source}:{skipped.contig}:{skipped.id or skipped.index} "
                                         f"{skipped.location} ({skipped.reason})")

    def summary(self) -> dict:
        """The keys of `GenomeRead.summary`, for logs and dataset_info.json."""
        return {"files": self.files, "contigs": self.contigs, "genes": self.genes, "skipped_cds": self.skipped_cds,
                "skipped_by_reason": dict(self.skipped_by_reason), "skipped_examples": list(self.skipped_examples)}


def iter_contigs(paths: Iterable[str | pathlib.Path], contig_table: str | pathlib.Path | None = None,
                 unknown: str = "error", report: ReadReport | None = None, unique: bool = True) -> Iterator[Contig]:
    """Contigs of every file (format from its name), one at a time, in input order.

    `report` (optional) counts files, contigs, genes and skipped CDS as they stream by. `unique`:
    a contig id seen before, in this file or an earlier one, is a GenomeFormatError naming both
    files and the record (contig ids key windows, shards and tables). `contig_table` and `unknown`
    as in `read_genomes`."""
    report = report if report is not None else ReadReport()
    paths = [pathlib.Path(p) for p in paths]
    seen = id_hashes.SeenHashes() if unique else None
    for number, path in enumerate(paths):
        report.files += 1
        for ordinal, contig in enumerate(iter_genome(path, contig_table, unknown, report.add_skipped), 1):
            if seen is not None:
                first = seen.add(contig.id, number)
                if first is not None:
                    where = "earlier in the same file" if first == number else f"in {paths[first]}"
                    raise GenomeFormatError(f"{path}: record {ordinal} {contig.id!r}: contig id already seen "
                                            f"{where}; contig ids must be unique over all inputs")
            report.add_contig(contig)
            yield contig


def read_genomes(paths: Iterable[str | pathlib.Path], contig_table: str | pathlib.Path | None = None,
                 unknown: str = "error") -> GenomeRead:
    """Reads every file (format from its name) into one `GenomeRead`, contigs in input order
    (a contig id may repeat across files here; `iter_contigs` refuses that).

    `contig_table` is required for protein FASTA and applies to all protein FASTA inputs. Proteins
    follow `fasta.clean_protein`: a residue outside the ESM2 alphabet is an error naming the record
    and position, or X with unknown="x"."""
    result = GenomeRead()
    for path in map(pathlib.Path, paths):
        result.extend(read_genome(path, contig_table=contig_table, unknown=unknown))
    return result


def read_genome(path: str | pathlib.Path, contig_table: str | pathlib.Path | None = None,
                unknown: str = "error") -> GenomeRead:
    result = GenomeRead()
    result.contigs = list(iter_genome(path, contig_table, unknown, result.skipped.append))
    return result


def iter_genome(path: str | pathlib.Path, contig_table: str | pathlib.Path | None = None, unknown: str = "error",
                skipped: Callable[[SkippedCDS], None] = lambda s: None) -> Iterator[Contig]:
    """The contigs of one file, one at a time; each skipped CDS is passed to `skipped`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"genome file not found: {path}")
    suffix = _format_suffix(path)
    if suffix in GENBANK_SUFFIXES:
        return _genbank_contigs(path, unknown, skipped)
    if suffix in GFF_SUFFIXES:
        return _contigs_of(read_gff3(path), skipped)
    if suffix in PROTEIN_FASTA_SUFFIXES or (suffix in AMBIGUOUS_FASTA_SUFFIXES and not _is_nucleotide_fasta(path)):
        if contig_table is None:
            raise GenomeFormatError(f"{path}: a protein FASTA needs a contig table (contig<TAB>+id;-id;...)")
        return _protein_fasta_contigs(path, pathlib.Path(contig_table), unknown)
    if suffix in NUCLEOTIDE_FASTA_SUFFIXES:
        return iter(call_genes(path).contigs)
    known = GENBANK_SUFFIXES + GFF_SUFFIXES + PROTEIN_FASTA_SUFFIXES + NUCLEOTIDE_FASTA_SUFFIXES
    raise GenomeFormatError(f"{path}: unknown genome format {suffix!r} (known: {' '.join(known)}, optionally .gz)")


def _contigs_of(read: GenomeRead, skipped: Callable[[SkippedCDS], None]) -> Iterator[Contig]:
    for cds in read.skipped:
        skipped(cds)
    yield from read.contigs


def _is_nucleotide_fasta(path: pathlib.Path) -> bool:
    """Whether the first sequence of a .fa/.fasta is nucleotides (else it is read as proteins)."""
    first = next(fasta.iter_fasta(path, protein=False))
    return set(first.sequence) <= NUCLEOTIDE_LETTERS


def _format_suffix(path: pathlib.Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _open_text(path: pathlib.Path) -> io.TextIOBase:
    return gzip.open(path, "rt") if path.suffix.lower() == ".gz" else open(path, "rt")


def _records(path: pathlib.Path, fmt: str) -> Iterator:
    """Biopython records of `path` (GenBank; FASTA goes through `fasta.read_fasta`); parser errors
    become GenomeFormatError naming file and record."""
    count, last = 0, None
    with _open_text(path) as handle:
        parser = None
        while True:
            try:
                parser = parser or SeqIO.parse(handle, fmt)  # the FASTA parser may already fail here
                record = next(parser)
            except StopIteration:
                break
            except (ValueError, EOFError, OSError, AssertionError) as error:
                after = f" (after {last!r})" if last else ""
                detail = " ".join(str(error).split())[:200] or type(error).__name__
                raise GenomeFormatError(f"{path}: malformed {fmt} record {count + 1}{after}: {detail}") from error
            count, last = count + 1, record.id
            yield record
    if count == 0:
        raise GenomeFormatError(f"{path}: no {fmt} records found")


def _genbank_labels(qualifiers: dict) -> tuple[tuple[str, str], ...]:
    labels = []
    for key in LABEL_QUALIFIERS:
        if key in qualifiers:
            joiner = REPEATED_QUALIFIER_JOINERS.get(key)
            value = joiner.join(part.strip() for part in qualifiers[key]) if joiner else qualifiers[key][0]
            labels.append((key, value))
    return tuple(labels)


def _sorted_genes(genes: list[Gene]) -> tuple[Gene, ...]:
    # Stable: files already in genomic order (NCBI, Pharokka) keep their order exactly.
    return tuple(sorted(genes, key=lambda g: g.start or 0))


def read_genbank(path: str | pathlib.Path, unknown: str = "error") -> GenomeRead:
    """GenBank (multi-record, gzipped or not): one contig per record, one gene per translated CDS.

    CDS flagged /pseudo or /pseudogene, or without /translation, are skipped and reported. Gene ids:
    /protein_id, else /locus_tag, else the first /db_xref, else `<record>_cds<ordinal>`."""
    result = GenomeRead()
    result.contigs = list(_genbank_contigs(pathlib.Path(path), unknown, result.skipped.append))
    return result


def _genbank_contigs(path: pathlib.Path, unknown: str, skipped: Callable[[SkippedCDS], None]) -> Iterator[Contig]:
    """`read_genbank`, one record at a time."""
    ordinal = 0  # CDS ordinal over the whole file, as row-wise tables (operon.annot) count them
    for record in _records(path, "genbank"):
        genes = []
        for feature in record.features:
            if feature.type != "CDS":
                continue
            ordinal += 1
            q = feature.qualifiers
            if feature.location is None:  # Biopython only warns about an unparseable location
                raise GenomeFormatError(f"{path}: record {record.id!r}: CDS {ordinal} has an unparseable location")
            gene_id = next((q[k][0] for k in ("protein_id", "locus_tag", "db_xref") if k in q), f"{record.id}_cds{ordinal}")
            reason = ("pseudo" if "pseudo" in q or "pseudogene" in q else
                      "no translation" if "translation" not in q else
                      "no strand" if feature.location.strand not in (1, -1) else None)
            if reason:
                skipped(SkippedCDS(path.name, record.id, ordinal, gene_id, str(feature.location), reason))
                continue
            where = f"{path}: record {record.id!r} CDS {gene_id!r}"
            genes.append(Gene(gene_id, fasta.clean_protein(q["translation"][0], where, unknown), int(feature.location.strand),
                              int(feature.location.start) + 1, int(feature.location.end), record.id, ordinal,
                              _genbank_labels(q)))
        yield Contig(record.id, path.name, _sorted_genes(genes))


# --- GFF3 ------------------------------------------------------------------------------------

@dataclasses.dataclass
class _GffCds:
    seqid: str
    id: str
    attributes: dict
    parts: list = dataclasses.field(default_factory=list)  # (start, end, strand, phase), 1-based


def _parse_gff_attributes(text: str, where: str) -> dict[str, str]:
    attributes = {}
    for item in filter(None, text.strip().strip(";").split(";")):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise GenomeFormatError(f"{where}: attribute {item!r} is not key=value")
        attributes[urllib.parse.unquote(key)] = urllib.parse.unquote(value)
    return attributes


def _read_gff_lines(path: pathlib.Path) -> tuple[list[_GffCds], str]:
    """CDS features grouped by ID (a multi-line CDS is one feature), in file order; and the text of
    the ##FASTA section ("" if none)."""
    cds: dict[tuple[str, str], _GffCds] = {}
    with _open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if line.startswith("##FASTA"):
                return list(cds.values()), handle.read()
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.rstrip("\n\r").split("\t")
            where = f"{path}: line {number}"
            if len(fields) != 9:
                raise GenomeFormatError(f"{where}: expected 9 tab-separated GFF3 columns, got {len(fields)}")
            seqid, _, ftype, start, end, _, strand, phase, attrs = fields
            if ftype != "CDS":
                continue
            try:
                start, end, phase = int(start), int(end), int(phase) if phase != "." else 0
            except ValueError:
                raise GenomeFormatError(f"{where}: start/end/phase must be integers: {fields[3:8]}") from None
            if strand not in "+-" or start > end:
                raise GenomeFormatError(f"{where}: bad strand {strand!r} or start {start} > end {end}")
            attributes = _parse_gff_attributes(attrs, where)
            key = (seqid, attributes.get("ID") or attributes.get("Parent") or f"line{number}")
            entry = cds.setdefault(key, _GffCds(seqid, key[1], attributes))
            entry.parts.append((start, end, 1 if strand == "+" else -1, phase))
    return list(cds.values()), ""


def _gff_fasta(path: pathlib.Path, fasta_text: str) -> dict[str, str]:
    """The GFF's nucleotide sequences: its ##FASTA section, else a sibling FASTA file."""
    if fasta_text:
        origin = f"{path} ##FASTA"
        records = fasta.parse_fasta(io.StringIO(fasta_text), origin, protein=False)
    else:
        stem = path.name[: -len("".join(path.suffixes))] if path.suffixes else path.name
        candidates = [path.with_name(stem + s + gz) for s in NUCLEOTIDE_FASTA_SUFFIXES for gz in ("", ".gz")]
        sibling = next((c for c in candidates if c.is_file()), None)
        if sibling is None:
            raise GenomeFormatError(f"{path}: no ##FASTA section and no sibling FASTA ({stem}.fna/.fa/.fasta)")
        origin, records = str(sibling), fasta.read_fasta(sibling, protein=False)
    if not records:
        raise GenomeFormatError(f"{origin}: no sequences")
    return {r.id: r.sequence for r in records}


def _translate_cds(sequence: str, parts: list, table: int) -> str:
    """Protein of a (possibly joined) CDS: parts concatenated in transcription order, the phase of
    the first part trimmed, translated with `table`; a start codon that the table allows becomes M
    (as GenBank /translation does for GTG/TTG starts)."""
    strand = parts[0][2]
    ordered = sorted(parts, key=lambda p: p[0], reverse=strand < 0)
    pieces = [Seq(sequence[s - 1:e]) for s, e, _, _ in ordered]
    nucleotides = sum((p.reverse_complement() if strand < 0 else p for p in pieces), Seq(""))
    phase = ordered[0][3]
    nucleotides = nucleotides[phase:]
    nucleotides = nucleotides[: len(nucleotides) // 3 * 3]
    protein = str(nucleotides.translate(table=table))
    if phase == 0 and str(nucleotides[:3]) in CodonTable.unambiguous_dna_by_id[table].start_codons:
        protein = "M" + protein[1:]
    return protein


def read_gff3(path: str | pathlib.Path) -> GenomeRead:
    """GFF3 with its sequences: one contig per sequence id, CDS translated from the nucleotides.

    Skipped and reported: `pseudo=true` CDS, parts on both strands, CDS on an unknown sequence,
    and translations with an internal stop (e.g. selenocysteine recoding, which a GFF cannot say)."""
    path = pathlib.Path(path)
    features, fasta_text = _read_gff_lines(path)
    sequences = _gff_fasta(path, fasta_text)
    by_contig: dict[str, list[Gene]] = {seqid: [] for seqid in sequences}
    result = GenomeRead()
    for ordinal, cds in enumerate(features, 1):
        start, end = min(p[0] for p in cds.parts), max(p[1] for p in cds.parts)
        location = f"{cds.seqid}:{start}..{end}"
        gene_id = cds.attributes.get("protein_id") or cds.attributes.get("locus_tag") or cds.id
        strands = {p[2] for p in cds.parts}
        reason = ("pseudo" if cds.attributes.get("pseudo", "").lower() == "true" else
                  "mixed strands" if len(strands) > 1 else
                  "unknown sequence" if cds.seqid not in sequences else None)
        if reason is None:
            if end > len(sequences[cds.seqid]):
                raise GenomeFormatError(f"{path}: CDS {cds.id!r} ends at {end}, beyond {cds.seqid!r} ({len(sequences[cds.seqid])} bp)")
            table = int(cds.attributes.get("transl_table", 11))
            protein = _translate_cds(sequences[cds.seqid], cds.parts, table).rstrip("*")
            reason = "internal stop codon" if "*" in protein else "empty translation" if not protein else None
        if reason:
            result.skipped.append(SkippedCDS(path.name, cds.seqid, ordinal, gene_id, location, reason))
            continue
        labels = tuple((k, cds.attributes[k]) for k in LABEL_QUALIFIERS if k in cds.attributes)
        by_contig[cds.seqid].append(Gene(gene_id, protein, strands.pop(), start, end, cds.seqid, ordinal, labels))
    result.contigs = [Contig(seqid, path.name, _sorted_genes(genes)) for seqid, genes in by_contig.items()]
    return result


# --- protein FASTA + contig table -------------------------------------------------------------

def read_contig_table(path: str | pathlib.Path) -> list[tuple[str, list[tuple[int, str]]]]:
    """`contig<TAB>+id;-id;...` lines -> [(contig, [(strand, id), ...])] (the original's
    contig_to_prots.tsv; a missing trailing newline is fine)."""
    return [(contig, entries) for _, contig, entries in iter_contig_table(path)]


def iter_contig_table(path: str | pathlib.Path) -> Iterator[tuple[int, str, list[tuple[int, str]]]]:
    """`read_contig_table` one line at a time -> (line number, contig, [(strand, id), ...])."""
    path = pathlib.Path(path)
    count = 0
    with _open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n\r").split("\t")
            tokens = fields[1].split(";") if len(fields) == 2 else []
            if not tokens or any(len(t) < 2 or t[0] not in "+-" for t in tokens):
                raise GenomeFormatError(f"{path}: line {number}: expected contig<TAB>+id;-id;..., got {line.strip()[:80]!r}")
            count += 1
            yield number, fields[0], [(1 if t[0] == "+" else -1, t[1:]) for t in tokens]
    if not count:
        raise GenomeFormatError(f"{path}: empty contig table")


def read_protein_fasta(path: str | pathlib.Path, contig_table: str | pathlib.Path, unknown: str = "error") -> GenomeRead:
    """Protein FASTA + contig table: genes in table order with the table's orientation."""
    return GenomeRead(list(_protein_fasta_contigs(pathlib.Path(path), pathlib.Path(contig_table), unknown)))


class _ProteinLookup:
    """Proteins of a FASTA by id, read as far ahead as the contig table needs: records read past
    wait in `pending` until their contig comes (nothing waits when both list the proteins in the
    same order). An id asked for twice (a protein on two contigs) is found by a rescan of the file."""

    def __init__(self, path: pathlib.Path, unknown: str):
        self.path, self.unknown = path, unknown
        self.records = fasta.iter_fasta(path, unknown=unknown)
        self.pending: dict[str, str] = {}
        self.ids = id_hashes.SeenHashes()

    def get(self, protein_id: str) -> str | None:
        if protein_id in self.pending:
            return self.pending.pop(protein_id)
        for record in self.records:
            if self.ids.add(record.id) is not None:
                raise fasta.FastaError(f"{self.path}: record {record.id!r} (line {record.line}): duplicate id")
            if record.id == protein_id:
                return record.sequence
            self.pending[record.id] = record.sequence
        return next((r.sequence for r in fasta.iter_fasta(self.path, unknown=self.unknown) if r.id == protein_id), None)


def _protein_fasta_contigs(path: pathlib.Path, contig_table: pathlib.Path, unknown: str) -> Iterator[Contig]:
    proteins = _ProteinLookup(path, unknown)
    for number, contig, entries in iter_contig_table(contig_table):
        sequences = [proteins.get(pid) for _, pid in entries]
        missing = [pid for (_, pid), sequence in zip(entries, sequences) if sequence is None]
        if missing:
            raise GenomeFormatError(f"{contig_table}: line {number}: contig {contig!r} lists proteins not in "
                                    f"{path}: {missing[:5]}")
        yield Contig(contig, path.name, tuple(Gene(pid, sequence, strand, None, None, contig, i)
                                              for i, ((strand, pid), sequence) in enumerate(zip(entries, sequences), 1)))


# --- nucleotide FASTA via pyrodigal -----------------------------------------------------------

# Prodigal's single mode trains on the genome and needs at least this many bases.
PRODIGAL_MIN_TRAINING_BASES = 20_000


def call_genes(path: str | pathlib.Path) -> GenomeRead:
    """Nucleotide FASTA -> genes called by pyrodigal: one contig per sequence, gene ids
    `<contig>_<n>` as Prodigal names them. Trains on all sequences of the file together when
    they hold >= 20 kb (single mode), else uses the pre-trained metagenomic models."""
    try:
        import pyrodigal
    except ImportError:
        raise ImportError("gene calling on nucleotide FASTA needs pyrodigal: pip install 'glm-jax[genecall]'") from None
    path = pathlib.Path(path)
    records = fasta.read_fasta(path, protein=False)
    for record in records:
        bad = set(record.sequence) - NUCLEOTIDE_LETTERS
        if bad:
            raise GenomeFormatError(f"{path}: record {record.id!r} is not nucleotide (letters {''.join(sorted(bad))[:10]!r}); "
                                    "use .faa and a contig table for proteins")
    sequences = [record.sequence.encode() for record in records]
    meta = sum(map(len, sequences)) < PRODIGAL_MIN_TRAINING_BASES
    finder = pyrodigal.GeneFinder(meta=meta)
    if not meta:
        finder.train(*sequences)
    result = GenomeRead()
    for record, sequence in zip(records, sequences):
        genes = [Gene(f"{record.id}_{n}", gene.translate(include_stop=False), int(gene.strand), gene.begin, gene.end, record.id, n)
                 for n, gene in enumerate(finder.find_genes(sequence), 1)]
        result.contigs.append(Contig(record.id, path.name, _sorted_genes(genes)))
    return result


def unique_proteins(contigs: Sequence[Contig]) -> list[str]:
    """Distinct protein sequences in first-seen order (each is embedded once)."""
    return list(dict.fromkeys(g.protein for c in contigs for g in c.genes))
