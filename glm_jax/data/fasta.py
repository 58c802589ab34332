"""The one FASTA reader of glm-jax and its rule for protein letters.

Every protein that reaches ESM2 -- from a FASTA file, a GenBank /translation, a GFF3 CDS -- passes
`clean_protein`: whitespace removed, upper case, trailing stops (`*`) dropped, and every other
character checked against the ESM2 alphabet (20 amino acids + X B U Z O). A character outside it (a
digit, `%`, an internal stop, `J`, a gap) is an error naming the record and its 1-based position,
unless the caller opts in with `unknown="x"`, which maps it to X (ESM2's unknown residue).
"""
from __future__ import annotations

import dataclasses
import gzip
import pathlib
from typing import Iterable, Iterator

from glm_jax.errors import InputError

AMINO_ACIDS = frozenset("ACDEFGHIKLMNPQRSTVWY")
# Ambiguity and rare residues that the ESM2 vocabulary has tokens for.
EXTRA_RESIDUES = frozenset("XBUZO")
PROTEIN_ALPHABET = AMINO_ACIDS | EXTRA_RESIDUES
UNKNOWN_POLICIES = ("error", "x")


class FastaError(InputError):
    """A malformed FASTA file or protein sequence; the message names the file, record and position."""


@dataclasses.dataclass(frozen=True)
class FastaRecord:
    id: str           # the header up to the first whitespace
    description: str  # the whole header line after '>'
    sequence: str     # as cleaned by `clean_protein` (proteins) or upper-cased letters (nucleotides)
    line: int         # 1-based line of the header


def clean_protein(sequence: str, where: str, unknown: str = "error") -> str:
    """The protein rule above. `where` names the record in errors (e.g. "file.faa: record 'p1'")."""
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown must be one of {UNKNOWN_POLICIES}, got {unknown!r}")
    protein = "".join(sequence.split()).upper().rstrip("*")
    if set(protein) <= PROTEIN_ALPHABET:
        return protein
    if unknown == "x":
        return "".join(c if c in PROTEIN_ALPHABET else "X" for c in protein)
    position, char = next((i, c) for i, c in enumerate(protein, 1) if c not in PROTEIN_ALPHABET)
    bad = "".join(sorted(set(protein) - PROTEIN_ALPHABET))
    raise FastaError(f"{where}: invalid residue {char!r} at position {position} (all invalid: {bad!r}); "
                     "--map-unknown-to-x maps such characters to X if that is intended")


def _open_text(path: pathlib.Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix.lower() == ".gz" else open(path, encoding="utf-8")


def read_fasta(path: str | pathlib.Path, *, protein: bool = True, unknown: str = "error") -> list[FastaRecord]:
    """Records of a FASTA file (plain or .gz), in file order.

    protein=True applies `clean_protein` to each sequence; otherwise sequences are upper-cased with
    whitespace removed. Raises FastaError naming the file and line or record for: an unreadable or
    truncated file, sequence data before the first header, a header without a name, an empty
    record, a duplicate id, no records at all, or (proteins) an invalid residue.
    """
    path = pathlib.Path(path)
    try:
        with _open_text(path) as handle:
            return parse_fasta(handle, str(path), protein=protein, unknown=unknown)
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise FastaError(f"{path}: cannot read as FASTA: {error}") from None


def parse_fasta(lines: Iterable[str], origin: str, *, protein: bool = True,
                unknown: str = "error") -> list[FastaRecord]:
    """`read_fasta` on FASTA text already open (e.g. a GFF3 ##FASTA section); `origin` names it."""
    return list(iter_records(lines, origin, protein=protein, unknown=unknown, seen=set()))


def iter_fasta(path: str | pathlib.Path, *, protein: bool = True, unknown: str = "error") -> Iterator[FastaRecord]:
    """`read_fasta` one record at a time, for files too large to hold: the same checks except the
    duplicate id (which needs every id; the streaming genome reader checks ids by hash instead)."""
    path = pathlib.Path(path)
    try:
        with _open_text(path) as handle:
            yield from iter_records(handle, str(path), protein=protein, unknown=unknown)
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise FastaError(f"{path}: cannot read as FASTA: {error}") from None


def iter_records(lines: Iterable[str], origin: str, *, protein: bool = True, unknown: str = "error",
                 seen: set[str] | None = None) -> Iterator[FastaRecord]:
    """The FASTA parser: records of `lines` in order; a duplicate id is an error when `seen` (the
    ids so far, filled in here) is given."""
    header: tuple[int, str] | None = None
    parts: list[str] = []
    count = 0

    def finish() -> FastaRecord:
        line, description = header
        name = description.split()[0]
        where = f"{origin}: record {name!r} (line {line})"
        if seen is not None and name in seen:
            raise FastaError(f"{where}: duplicate id")
        raw = "".join(parts)
        sequence = clean_protein(raw, where, unknown) if protein else "".join(raw.split()).upper()
        if not sequence:
            raise FastaError(f"{where}: empty sequence")
        if seen is not None:
            seen.add(name)
        return FastaRecord(name, description, sequence, line)

    for number, text in enumerate(lines, 1):
        text = text.strip()
        if text.startswith(">"):
            if header is not None:
                count += 1
                yield finish()
            description = text[1:].strip()
            if not description:
                raise FastaError(f"{origin}: line {number}: header without a name")
            header, parts = (number, description), []
        elif text:
            if header is None:
                raise FastaError(f"{origin}: line {number}: sequence data before the first '>' header")
            parts.append(text)
    if header is not None:
        count += 1
        yield finish()
    if not count:
        raise FastaError(f"{origin}: no FASTA records")
