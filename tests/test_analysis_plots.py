"""`glm-jax plot`: attention maps (one head, mean, grid) and embedding maps are written."""
import numpy as np
import pandas as pd
import pytest

from glm_jax.analysis import tables
from glm_jax.analysis.plots import _operon_spans
from glm_jax.cli.main import main
from helpers import fails


@pytest.fixture
def window(tmp_path):
    """One 12-slot window holding 10 genes (2 padding slots), its gene table and operon labels."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 2, 3, 12, 12))
    attentions = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # [windows, layers, heads, genes, genes]
    gene_ids = np.array([[f"p{i}" for i in range(10)] + ["", ""]] * 2)
    np.savez(tmp_path / "attn.npz", attentions=attentions.astype(np.float32), gene_ids=gene_ids)
    genes = pd.DataFrame({"gene_id": [f"p{i}" for i in range(10)], "locus_tag": [f"b{i:04d}" for i in range(10)],
                          "gene": [f"gen{i}" for i in range(10)], "contig": "c", "position": range(10),
                          "function": ["tail", "lysis"] * 5, "EC_number": ["1.1.1.1", "2.7.7.7"] * 5,
                          "embedding": list(rng.normal(size=(10, 6)).astype(np.float32))})
    genes.to_parquet(tmp_path / tables.GENES_FILE)
    operon_ids = ["thrLABC"] * 4 + ["", "x"] + ["lac"] * 3 + [""]
    pd.DataFrame({"locus_tag": genes["locus_tag"], "operon_id": operon_ids}).to_csv(tmp_path / "operons.tsv", sep="\t",
                                                                                      index=False)
    return tmp_path


def test_operon_spans_are_runs_of_two_or_more():
    assert _operon_spans(["a", "a", "a", "", "x", "b", "b", ""]) == [(0, 2), (5, 6)]


@pytest.mark.parametrize("options, name", [(["--layer", "1", "--head", "2"], "head.png"), ([], "mean.svg"),
                                           (["--grid", "--heads", "0,2"], "grid.png")])
def test_attention_plots_are_written(window, options, name):
    out = window / name
    assert main(["plot", "attention", "--attention", str(window / "attn.npz"), "--index", "1", "--tables", str(window),
                 "--labels", str(window / "operons.tsv"), "--output", str(out), *options]) == 0
    assert out.stat().st_size > 5_000
    if name.endswith(".svg"):
        text = out.read_text()
        assert "gen3" in text and "gen9" in text  # genes labelled by name, padding left out


def test_attention_map_from_an_inference_maps_directory(window, capsys):
    """The inference output layout: maps/attention-NNNNN.npy [windows_in_chunk, layers, heads, S, S]
    indexed by maps/windows.parquet (window, file, row, contig, start, num_genes, gene_ids)."""
    (window / "maps").mkdir()
    with np.load(window / "attn.npz") as f:
        np.save(window / "maps" / "attention-00000.npy", f["attentions"])
    pd.DataFrame({"window": [7, 8], "file": "attention-00000.npy", "row": [0, 1], "contig": "c", "start": [0, 0],
                  "num_genes": [10, 6], "gene_ids": [[f"p{i}" for i in range(10)], [f"p{i}" for i in range(6)]]}
                 ).to_parquet(window / "maps" / "windows.parquet")
    out = window / "maps8.svg"
    assert main(["plot", "attention", "--attention", str(window), "--index", "8", "--tables", str(window),
                 "--labels", str(window / "operons.tsv"), "--output", str(out)]) == 0
    assert "gen5" in out.read_text() and "gen6" not in out.read_text()  # num_genes=6: padding sliced off
    assert "windows.parquet: no window 3" in fails(capsys, "plot", "attention", "--attention", window, "--index", "3",
                                                   "--output", out)


def test_embedding_map_is_written_and_bad_input_is_named(window, capsys):
    for color_by in ("function", "ec_class"):
        out = window / f"emb_{color_by}.png"
        assert main(["plot", "embeddings", "--tables", str(window), "--color-by", color_by, "--output", str(out)]) == 0
        assert out.stat().st_size > 10_000
    assert "attn.npz: --index 5 outside 0..1" in fails(capsys, "plot", "attention", "--attention", window / "attn.npz",
                                                       "--index", "5", "--output", window / "x.png")
    assert "x.pdf: plots are written as png or svg" in fails(capsys, "plot", "embeddings", "--tables", window,
                                                             "--output", window / "x.pdf")
    assert not (window / "x.png").exists() and not (window / "x.pdf").exists()
