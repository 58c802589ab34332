"""Labels for the analyses: operon pairs (E. coli operons.tsv), EC class, prophage genes, PHROG category.

Operon table: a TSV with `locus_tag` and `operon_id` (empty = no operon), optionally `start`/`end`
(1-based) to check that it describes the same genome version. Two adjacent genes are a positive
pair when both have the same non-empty operon_id (the original operon_logreg.py rule).
"""
from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd

from glm_jax.analysis.tables import require_columns
from glm_jax.errors import InputError

PROBE_TASKS = ("ec_class", "is_phage", "phrog")
UNKNOWN_PHROG = "unknown function"


class LabelsMismatchError(InputError):
    """A labels table that does not describe the genome it is joined to."""


def read_operon_table(path: str | pathlib.Path) -> pd.DataFrame:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"operon labels not found: {path}")
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    for column in ("locus_tag", "operon_id"):
        if column not in table.columns:
            raise LabelsMismatchError(f"{path}: no {column!r} column (has {list(table.columns)})")
    return table


def _join_keys(table: pd.DataFrame) -> pd.Series:
    """locus_tag, or locus_tag:start:end when coordinates are given: a locus can carry several CDS
    (E. coli K-12 has 10 such locus_tags, e.g. b0149 with two alternative starts)."""
    if {"start", "end"} <= set(table.columns):
        return (table["locus_tag"].fillna("").astype(str) + ":" + table["start"].astype(int).astype(str) + ":"
                + table["end"].astype(int).astype(str))
    return table["locus_tag"].fillna("").astype(str)


def operon_pair_labels(genes: pd.DataFrame, pairs: pd.DataFrame, table_path: str | pathlib.Path) -> np.ndarray:
    """[pairs] int 0/1: 1 when both genes of the pair share an operon in the table at `table_path`.

    Every gene of the genome must be in the table, joined by locus_tag (and start/end when the
    table has coordinates): otherwise the table is for another genome or genome version."""
    table = read_operon_table(table_path)
    if "locus_tag" not in genes.columns:
        raise LabelsMismatchError(f"{table_path}: the genome's genes have no locus_tag to join on")
    with_coordinates = {"start", "end"} <= set(table.columns)
    table_keys = _join_keys(table)
    if table_keys.duplicated().any():
        raise LabelsMismatchError(f"{table_path}: row key {table_keys[table_keys.duplicated()].iloc[0]!r} "
                                  "(locus_tag[:start:end]) appears twice")
    gene_keys = _join_keys(genes if with_coordinates else genes[["locus_tag"]])
    operon_by_key = pd.Series(table["operon_id"].to_numpy(), index=table_keys.to_numpy())
    missing = ~gene_keys.isin(operon_by_key.index)
    if missing.any():
        raise LabelsMismatchError(f"{table_path}: no row for {int(missing.sum())} of {len(genes)} genes (first: "
                                  f"{gene_keys[missing].iloc[0]!r} as locus_tag{':start:end' if with_coordinates else ''})"
                                  ": the labels are not for this genome (version)")
    operon_of = dict(zip(genes["gene_id"], operon_by_key[gene_keys].to_numpy()))
    a = pairs["gene_id_a"].map(operon_of).to_numpy()
    b = pairs["gene_id_b"].map(operon_of).to_numpy()
    return ((a == b) & (a != "")).astype(np.int64)


def probe_labels(genes: pd.DataFrame, task: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(rows, y, classes) for a probe task: the gene rows that carry a label, their class indices,
    and the class names.

      ec_class  first digit of /EC_number (genes without one, or "-", are left out)
      is_phage  PhiSpy's /is_phage="1" (1) against every other gene of those genomes (0)
      phrog     Pharokka's /function category; "unknown function" genes are left out
    """
    if task == "ec_class":
        require_columns(genes, ("EC_number",), "gene table (EC class probe)")
        digit = genes["EC_number"].fillna("").str.split(".").str[0]
        names = digit.where(digit.str.fullmatch(r"[1-7]"))
    elif task == "is_phage":
        require_columns(genes, ("is_phage",), "gene table (prophage probe)")
        names = pd.Series(np.where(genes["is_phage"].fillna("0") == "1", "phage", "other"), index=genes.index)
    elif task == "phrog":
        require_columns(genes, ("function",), "gene table (PHROG probe)")
        names = genes["function"].where(genes["function"] != UNKNOWN_PHROG)
    else:
        raise InputError(f"unknown probe task {task!r} (known: {', '.join(PROBE_TASKS)})")
    keep = names.notna().to_numpy()
    classes = ["other", "phage"] if task == "is_phage" else sorted(set(names[keep]))
    index = {c: i for i, c in enumerate(classes)}
    return np.flatnonzero(keep), np.array([index[n] for n in names[keep]], np.int64), classes
