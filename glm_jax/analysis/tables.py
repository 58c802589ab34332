"""Gene and gene-pair tables: what every analysis reads.

With a checkpoint the tables come from `glm_jax.inference.genome.infer_genomes` (`genes.parquet`,
`pairs.parquet`: one row per gene / adjacent gene pair, model outputs as list<float32> columns).
Without one, `genome_gene_table` builds the model-free part of the same gene table straight from
the genome files, so the baselines (distance + strand, ESM2 cosine) need no model at all.

Gene table columns used here: gene_id, contig, position (0-based index in the contig), start, end
(1-based inclusive), strand (+1/-1), label qualifiers as strings (locus_tag, product, EC_number,
is_phage, function, ...), optional `protein` (sequence), `esm2`, `embedding`, `layer_<i>`,
`hypotheses`, `probabilities`. Pair table: contig, gene_id_a, gene_id_b, position_a, optional
`attention` (list<float32> [layers * heads]).
"""
from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
import pandas as pd

from glm_jax.errors import InputError

GENES_FILE = "genes.parquet"
PAIRS_FILE = "pairs.parquet"


class TableError(InputError):
    """A gene/pair table that lacks what an analysis needs; the message names the file and column."""


class FeatureWidthError(InputError):
    """A checkpoint whose input width does not fit the protein embeddings in use."""


def genome_gene_table(genome_paths: Sequence[str | pathlib.Path], contig_table: str | None = None) -> pd.DataFrame:
    """Genes of the genome files in genomic order, one row each, with `protein` (the sequence)."""
    from glm_jax.data import genomes

    rows = []
    for contig in genomes.read_genomes(genome_paths, contig_table=contig_table).contigs:
        for position, gene in enumerate(contig.genes):
            rows.append({"gene_id": gene.id, "genome": contig.source, "contig": contig.id, "position": position,
                         "start": gene.start, "end": gene.end, "strand": gene.strand, "protein": gene.protein,
                         **gene.label_dict})
    table = pd.DataFrame(rows)
    if table.empty:
        raise TableError(f"no protein-coding genes in {', '.join(map(str, genome_paths))}")
    duplicated = table["gene_id"].duplicated(keep=False)
    # ids must be unique (they key the pair table); disambiguate repeats by contig and position
    table.loc[duplicated, "gene_id"] = (table.loc[duplicated, "gene_id"] + "@" + table.loc[duplicated, "contig"]
                                        + ":" + table.loc[duplicated, "position"].astype(str))
    return table


def adjacent_pairs(genes: pd.DataFrame) -> pd.DataFrame:
    """Every pair of neighbouring genes (positions i, i+1 of one contig), with the intergenic
    `distance` in bp (start_b - end_a - 1; negative = overlap) and `same_strand` (0/1)."""
    require_columns(genes, ("gene_id", "contig", "position", "start", "end", "strand"), "gene table")
    genes = genes.sort_values(["contig", "position"], kind="stable")
    nxt = genes.groupby("contig", sort=False).shift(-1)
    keep = nxt["gene_id"].notna().to_numpy()
    a, b = genes[keep], nxt[keep]
    return pd.DataFrame({
        "contig": a["contig"].to_numpy(), "gene_id_a": a["gene_id"].to_numpy(), "gene_id_b": b["gene_id"].to_numpy(),
        "position_a": a["position"].to_numpy(np.int64),
        "distance": (b["start"].to_numpy(np.float64) - a["end"].to_numpy(np.float64) - 1),
        "same_strand": (a["strand"].to_numpy() == b["strand"].to_numpy()).astype(np.int64)})


def require_columns(table: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise TableError(f"{where} has no column {', '.join(map(repr, missing))} (has {sorted(table.columns)})")


def stack(table: pd.DataFrame, column: str, where: str = "gene table") -> np.ndarray:
    """A list<float> column -> [rows, width] float32; rows must all have the same width."""
    require_columns(table, (column,), where)
    values = table[column].to_list()
    widths = {len(v) for v in values if v is not None}
    if any(v is None for v in values) or len(widths) != 1:
        raise TableError(f"{where}: column {column!r} has missing or ragged rows (widths {sorted(widths)})")
    return np.asarray(np.stack([np.asarray(v, np.float32) for v in values]), np.float32)


def read_tables(directory: str | pathlib.Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The gene table (and the pair table when present) of an inference output directory."""
    from glm_jax.inference import genome

    directory = pathlib.Path(directory)
    pairs = genome.read_pair_table(directory) if (directory / PAIRS_FILE).is_file() else None
    return genome.read_gene_table(directory), pairs


def attach_esm2(genes: pd.DataFrame, store_dir: str | pathlib.Path, esm2_dir: str | pathlib.Path | None = None,
                progress: bool = False) -> pd.DataFrame:
    """Adds the `esm2` column (mean-pooled ESM2 of each protein) from the embedding store at
    `store_dir`, embedding what is missing with the ESM2 model at `esm2_dir` (None: the default)."""
    from glm_jax.proteins import embed

    require_columns(genes, ("protein",), "gene table")
    store = embed.embed_proteins(genes["protein"].to_list(), store_dir, esm2_dir, progress=progress)
    vectors = store.get([embed.normalise_sequence(p) for p in genes["protein"]]).astype(np.float32)
    return genes.assign(esm2=list(vectors))


def check_feature_width(checkpoint: str | pathlib.Path, esm2_dim: int, source: str) -> None:
    """The model input is the protein embedding + 1 orientation value: fail before any work when a
    checkpoint was trained on another protein model (e.g. ESM2-650M: 1281 vs ESM2-8M: 321)."""
    from glm_jax.model import checkpoint as model_checkpoint

    config = model_checkpoint.read_model_config(checkpoint)
    if config.emb_dim != esm2_dim + 1:
        raise FeatureWidthError(f"{checkpoint}: model emb_dim {config.emb_dim} needs {config.emb_dim - 1}-d protein "
                                f"embeddings, but {source} gives {esm2_dim}-d ones")


def esm2_width(esm2_dir: str | pathlib.Path | None) -> tuple[int, str]:
    """Hidden size of the ESM2 model at `esm2_dir` (None: the default one) and its path."""
    from glm_jax.proteins import embed, esm2

    path = pathlib.Path(esm2_dir) if esm2_dir is not None else embed.default_esm2_dir()
    config, _ = esm2.load_esm2(path)
    return config.hidden_size, str(path)
