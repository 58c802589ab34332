"""Golden tables of `glm-jax infer` on the shipped 5-phage genome with a tiny gLM, recorded with
the code before streaming inference (commit 078db96) and compared against by tests/test_infer_stream.py.

    GLM_JAX_RECORD_GOLDEN=1 pytest tests/test_infer_stream.py -k golden   # rewrites the golden

Every non-numeric column is kept as is (compared exactly); every vector column becomes two fixed
random projections per row (float64, compared with a tolerance: CPUs differ in float rounding),
so the golden stays small (~60 kB) and still checks each row's values.
"""
import gzip
import pathlib

import numpy as np
import pandas as pd

REPO = pathlib.Path(__file__).resolve().parents[1]
META = REPO / "data" / "genomes" / "pharokka_meta_5phages.gbk.gz"
GOLDEN = pathlib.Path(__file__).with_name("golden")
GENES_GOLDEN, PAIRS_GOLDEN = GOLDEN / "infer_meta_genes.parquet", GOLDEN / "infer_meta_pairs.parquet"
# what the golden run used (besides the module fixture of test_infer_stream: tiny gLM + stand-in store)
OPTIONS = dict(window=30, stride=15, layers=(0, 2), hypotheses=True, context_only=True, attention="pairs",
               include_esm2=True, batch_size=8, chunk_windows=4, progress=False)


def make_setup(root: pathlib.Path, esm2_dir: pathlib.Path) -> dict:
    """A tiny gLM model directory (emb_dim 33 = the tiny ESM2's 32 + orientation) holding a
    normalisation/PCA fitted on an ESM2 store of the genome's proteins. The store is pre-filled
    under the tiny ESM2's identity with stand-in embeddings (running even the tiny ESM2 over 559
    proteins compiles ~18 shapes, over a minute on 2 busy cores), except for the 7 proteins of
    `short` (the first genes of NC_004617.1), which `infer` embeds with the model."""
    from glm_jax.data import features
    from glm_jax.model import checkpoint
    from glm_jax.model.glm import GLMConfig, create_model
    from glm_jax.proteins import embed as protein_embed

    records = biopython_records(META)
    proteins = list(dict.fromkeys(p for genes in records.values() for _, p, _ in genes))
    short = {p for _, p, _ in records["NC_004617.1"][:7]}
    identity = protein_embed.Esm2Embedder.load(esm2_dir).identity(max_residues=12_288)
    store = protein_embed.EmbeddingStore(root / "store", model=identity)
    stand_ins = [p for p in proteins if p not in short]
    rng = np.random.default_rng(0)
    store.add(stand_ins, rng.normal(size=(len(stand_ins), 32)) * np.linspace(2, 0.2, 32) + 0.5)
    transform = features.fit_feature_transform(store.get(stand_ins), num_components=15)
    config = GLMConfig(emb_dim=33, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                       max_position_embeddings=32, max_genes=30, num_pc=16, initializer_range=0.3)
    model = create_model(config, seed=7)
    checkpoint.save_model(root / "model", model)
    transform.save(root / "model" / "normalization.npz")
    common = dict(store_dir=root / "store", esm2_dir=esm2_dir)
    return dict(root=root, records=records, transform=transform, model=model, common=common, esm2=esm2_dir,
                short=short)


def biopython_records(path):
    """{record id: [(locus_tag, protein, strand), ...]} of translated, non-pseudo CDS, file order."""
    from Bio import SeqIO
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        return {r.id: [(f.qualifiers["locus_tag"][0], f.qualifiers["translation"][0].rstrip("*"), f.location.strand)
                       for f in r.features if f.type == "CDS" and "translation" in f.qualifiers
                       and "pseudo" not in f.qualifiers] for r in SeqIO.parse(handle, "genbank")}


def projected(table: pd.DataFrame) -> pd.DataFrame:
    """Vector (list) columns -> `<name>@0`, `<name>@1`: row . u for two fixed random unit vectors u."""
    out = {}
    for name in table.columns:
        first = table[name].iloc[0]
        if isinstance(first, (np.ndarray, list)):
            matrix = np.stack(table[name].to_numpy()).astype(np.float64)
            u = np.random.default_rng(len(name)).normal(size=(matrix.shape[1], 2))
            u /= np.linalg.norm(u, axis=0)
            out[f"{name}@0"], out[f"{name}@1"] = (matrix @ u).T
        else:
            out[name] = table[name].to_numpy()
    return pd.DataFrame(out)


def compare(table: pd.DataFrame, golden: pd.DataFrame, atol: float = 2e-4) -> None:
    """Equal row by row: exact for metadata, within atol for projections of vectors."""
    got = projected(table)
    assert list(got.columns) == list(golden.columns), (list(got.columns), list(golden.columns))
    assert len(got) == len(golden)
    for name in golden.columns:
        if "@" in name:
            np.testing.assert_allclose(got[name].to_numpy(), golden[name].to_numpy(), atol=atol, err_msg=name)
        else:
            pd.testing.assert_series_equal(got[name], golden[name], check_names=False, obj=name)
