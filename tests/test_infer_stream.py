"""Streaming `infer`: the same tables as before the change (golden), bounded buffers, and the
distributed run equal to one process."""
import os

import pytest

import infer_golden
from glm_jax.inference import genome


@pytest.fixture(scope="module")
def setup(tiny_esm2_dir, tmp_path_factory):
    return infer_golden.make_setup(tmp_path_factory.mktemp("infer_stream"), tiny_esm2_dir)


def test_tables_equal_the_golden_of_the_code_before_streaming(setup):
    out = genome.infer_genomes([infer_golden.META], setup["root"] / "model", setup["root"] / "golden",
                               **setup["common"], **infer_golden.OPTIONS, log=lambda _: None)
    genes, pairs = genome.read_gene_table(out), genome.read_pair_table(out)
    if os.environ.get("GLM_JAX_RECORD_GOLDEN"):
        infer_golden.projected(genes).to_parquet(infer_golden.GENES_GOLDEN, index=False)
        infer_golden.projected(pairs).to_parquet(infer_golden.PAIRS_GOLDEN, index=False)
    import pandas as pd
    infer_golden.compare(genes, pd.read_parquet(infer_golden.GENES_GOLDEN))
    infer_golden.compare(pairs, pd.read_parquet(infer_golden.PAIRS_GOLDEN))
