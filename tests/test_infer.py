"""`glm-jax infer` on a shipped multi-record phage genome (Pharokka meta mode: 5 contigs, 559 CDS).

ESM2 here is the random tiny ESM2 of `tiny_esm2_dir` (32-d; the real ESM2-8M takes minutes on
2 CPU cores), so the tiny gLM has emb_dim 33 = 32 + orientation. Expected values come from
Biopython read directly (CDS counts, proteins, strands), from features computed here in numpy
from their definition, and from `predict.forward` run on one window.
"""
import gzip
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest
from Bio import SeqIO
from Bio.SeqFeature import FeatureLocation, SeqFeature

import infer_golden

from glm_jax.cli import main as cli
from glm_jax.inference import genome, inputs
from glm_jax.inference.predict import forward
from glm_jax.model import checkpoint
from glm_jax.model.glm import create_model
from glm_jax.proteins import embed as protein_embed

META = infer_golden.META
WINDOW, STRIDE = 30, 15
OPTIONS = infer_golden.OPTIONS  # window 30, stride 15, every output, 4 windows per chunk


@pytest.fixture(scope="module")
def setup(tiny_esm2_dir, tmp_path_factory):
    """ESM2 store of the genome's proteins, a normalisation/PCA fitted on it, a tiny gLM model
    directory holding that normalization.npz (tests/infer_golden.py)."""
    return infer_golden.make_setup(tmp_path_factory.mktemp("infer"), tiny_esm2_dir)


@pytest.fixture(scope="module")
def run8(setup):
    """The whole genome on all 8 devices, 4 windows per chunk."""
    return genome.infer_genomes([META], setup["root"] / "model", setup["root"] / "run8", **setup["common"],
                                **OPTIONS, log=lambda _: None)


def store_get(setup, proteins):
    return protein_embed.EmbeddingStore(setup["common"]["store_dir"]).get(proteins)


def window_inputs(setup, contig, start, size):
    """The model input of genes [start, start + size) of a contig, from the definition: float16
    ESM2 -> (e - mean) / std, orientation +-0.5, rounded to float16 as make-shards stores it."""
    genes = setup["records"][contig][start:start + size]
    e = store_get(setup, [p for _, p, _ in genes]).astype(np.float64)
    t = setup["transform"]
    z = (e - t.mean) / t.std
    o = np.array([[0.5 if s > 0 else -0.5] for _, _, s in genes])
    inputs = np.zeros((1, WINDOW, 33), np.float32)
    inputs[0, :size] = np.concatenate([z, o], 1).astype(np.float16)
    mask = np.zeros((1, WINDOW), np.float32)
    mask[0, :size] = 1
    return {"inputs_embeds": inputs, "attention_mask": mask}


def test_one_row_per_cds_and_contigs_kept_apart(setup, run8):
    genes = genome.read_gene_table(run8)
    records = setup["records"]
    assert len(genes) == sum(map(len, records.values())) == 559
    assert genes["gene_id"].is_unique
    assert list(dict.fromkeys(genes["contig"])) == list(records)
    for contig, expected in records.items():
        rows = genes[genes["contig"] == contig]
        assert list(rows["locus_tag"]) == [tag for tag, _, _ in expected]
        assert list(rows["position"]) == list(range(len(expected)))
        assert list(rows["strand"]) == [s for _, _, s in expected]
        # the window a row comes from lies inside its contig
        assert (rows["window_start"] >= 0).all() and (rows["window_start"] + min(WINDOW, len(expected)) <= len(expected)).all()
    # cds_index: the CDS ordinal over the whole file (this file has no pseudo CDS)
    assert list(genes["cds_index"]) == list(range(1, 560))
    pairs = genome.read_pair_table(run8)
    assert len(pairs) == sum(len(g) - 1 for g in records.values())
    contig_of = dict(zip(genes["gene_id"], genes["contig"]))
    assert all(contig_of[a] == contig_of[b] == c for a, b, c in zip(pairs["gene_id_a"], pairs["gene_id_b"], pairs["contig"]))
    # columns of the contract
    stack = lambda column: np.stack(genes[column].to_numpy())
    assert stack("embedding").shape == (559, 16) and stack("hypotheses").shape == (559, 4 * 16)
    np.testing.assert_array_equal(stack("layer_2"), stack("embedding"))  # the last layer is the embedding
    np.testing.assert_allclose(stack("probabilities").sum(1), 1.0, atol=1e-5)
    assert stack("context_embedding").shape == (559, 16) and stack("context_probabilities").shape == (559, 4)
    np.testing.assert_array_equal(stack("esm2"), store_get(setup, [p for g in records.values() for _, p, _ in g]))
    assert stack("label_embedding").shape == (559, 16)
    assert np.stack(pairs["attention"].to_numpy()).shape == (554, 2 * 2)
    assert set(genes["function"]) >= {"tail", "lysis"} and genes["phrog"].notna().all()


@pytest.mark.parametrize("contig, position, window_start", [
    ("NC_004617.1", 0, 0), ("NC_004617.1", 22, 0),   # 22: centre 14.5 of [0, 30) ties with 29.5 of [15, 45)
    ("NC_004617.1", 23, 15), ("NC_004617.1", 45, 30), ("NC_004617.1", 62, 33),  # 63 genes: last window [33, 63)
])
def test_gene_row_is_forward_on_its_most_central_window(setup, run8, contig, position, window_start):
    genes = genome.read_gene_table(run8)
    row = genes[(genes["contig"] == contig) & (genes["position"] == position)].iloc[0]
    assert row["window_start"] == window_start
    batch = window_inputs(setup, contig, window_start, WINDOW)
    direct = forward(setup["model"], batch)
    j = position - window_start
    np.testing.assert_allclose(row["embedding"], direct["last_hidden_state"][0, j], atol=2e-5)
    np.testing.assert_allclose(row["layer_0"], direct["hidden_states"][0, 0, j], atol=2e-5)
    np.testing.assert_allclose(row["hypotheses"], direct["predictions"][0, j].reshape(-1), atol=2e-5)
    np.testing.assert_allclose(row["probabilities"], direct["probabilities"][0, j], atol=2e-6)
    masked = forward(setup["model"], {**batch, "masked_tokens": np.arange(WINDOW)[None] == j})
    np.testing.assert_allclose(row["context_embedding"], masked["last_hidden_state"][0, j], atol=2e-5)
    np.testing.assert_allclose(row["context_probabilities"], masked["probabilities"][0, j], atol=2e-6)


def test_pair_features_average_the_windows_holding_both_genes(setup, run8):
    """Pair (60, 61) of the 212-gene contig lies in windows [45, 75) and [60, 90), which fall in
    different chunks (4 windows each); its feature is the mean of forward's contacts there."""
    pairs = genome.read_pair_table(run8)
    row = pairs[(pairs["contig"] == "MW460250_1") & (pairs["position_a"] == 60)].iloc[0]
    assert row["num_windows"] == 2
    contacts = [forward(setup["model"], window_inputs(setup, "MW460250_1", s, WINDOW))["contacts"][0, 60 - s, 61 - s]
                for s in (45, 60)]
    np.testing.assert_allclose(row["attention"], np.mean(contacts, 0), atol=1e-6)
    single = pairs[(pairs["contig"] == "MW460250_1") & (pairs["position_a"] == 0)].iloc[0]
    assert single["num_windows"] == 1


def test_short_contig_is_one_padded_window_and_maps(setup, tmp_path):
    """A 7-gene record: one window, rows equal forward on it padded to 30; maps hold its attention."""
    with gzip.open(META, "rt") as handle:
        record = next(r for r in SeqIO.parse(handle, "genbank") if r.id == "NC_004617.1")
    cds = [f for f in record.features if f.type == "CDS"][:7]
    record.features = cds
    path = tmp_path / "short.gbk"
    SeqIO.write(record, path, "genbank")
    out = genome.infer_genomes([path], setup["root"] / "model", tmp_path / "out", **setup["common"],
                               attention="maps", progress=False, log=lambda _: None)
    genes = genome.read_gene_table(out)
    assert list(genes["position"]) == list(range(7)) and (genes["window_start"] == 0).all()
    direct = forward(setup["model"], window_inputs(setup, "NC_004617.1", 0, 7))
    np.testing.assert_allclose(np.stack(genes["embedding"].to_numpy()), direct["last_hidden_state"][0, :7], atol=2e-5)
    index = pd.read_parquet(out / "maps" / "windows.parquet")
    assert len(index) == 1 and index["num_genes"][0] == 7 and list(index["gene_ids"][0]) == list(genes["gene_id"])
    maps = np.load(out / "maps" / index["file"][0], mmap_mode="r")
    np.testing.assert_allclose(maps[index["row"][0], :, :, :7, :7], direct["attentions"][0, :, :, :7, :7], atol=1e-6)


def test_same_results_on_one_and_eight_devices(setup, run8, tmp_path):
    """8 windows per call over 8 devices vs 1 window per call on 1 device: each device computes the
    same [1, 30, 33] program, so the results are bitwise equal (with 8 windows on one device XLA
    blocks the matmuls differently and they differ by float32 rounding, ~1e-6)."""
    assert jax.device_count() == 8
    one = genome.infer_genomes([META], setup["root"] / "model", tmp_path / "one", **setup["common"],
                               **{**OPTIONS, "batch_size": 1}, devices=jax.devices()[:1], log=lambda _: None)
    a, b = genome.read_gene_table(run8), genome.read_gene_table(one)
    assert list(a["gene_id"]) == list(b["gene_id"])
    for column in ("embedding", "layer_0", "hypotheses", "probabilities", "context_embedding"):
        np.testing.assert_array_equal(np.stack(a[column].to_numpy()), np.stack(b[column].to_numpy()), err_msg=column)
    np.testing.assert_array_equal(np.stack(genome.read_pair_table(run8)["attention"].to_numpy()),
                                  np.stack(genome.read_pair_table(one)["attention"].to_numpy()))


def test_resume_after_sigkill_recomputes_only_missing_windows(setup, run8, tmp_path):
    out = tmp_path / "killed"
    script = pathlib.Path(__file__).with_name("infer_subprocess.py")
    done = subprocess.run([sys.executable, str(script), "5", str(META), str(setup["root"] / "model"), str(out),
                           str(setup["common"]["store_dir"]), str(setup["esm2"])],
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    finished = sorted((out / "parts").glob("genes-*.parquet"))
    assert [p.name for p in finished] == [f"genes-{n:05d}.parquet" for n in range(5)]
    assert (out / "parts" / "pairs-00005.parquet").is_file()  # the half-written chunk
    genome.infer_genomes([META], setup["root"] / "model", out, **setup["common"], batch_size=8, attention="pairs",
                         chunk_windows=1, progress=False, log=lambda _: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["runs"][-1]["computed_chunks"] == list(range(5, 35))
    assert manifest["runs"][-1]["model_calls"] == 30  # one window per chunk, one call each
    whole = genome.read_gene_table(run8)
    resumed = genome.read_gene_table(out)
    np.testing.assert_allclose(np.stack(resumed["embedding"].to_numpy()), np.stack(whole["embedding"].to_numpy()), atol=1e-6)
    np.testing.assert_allclose(np.stack(genome.read_pair_table(out)["attention"].to_numpy()),
                               np.stack(genome.read_pair_table(run8)["attention"].to_numpy()), atol=1e-6)
    # a completed run is not recomputed; other settings in the same directory are refused
    genome.infer_genomes([META], setup["root"] / "model", out, **setup["common"], batch_size=8, attention="pairs",
                         chunk_windows=1, progress=False, log=lambda _: None)
    assert len(json.loads((out / "manifest.json").read_text())["runs"]) == 1  # the killed run recorded none
    with pytest.raises(genome.InferenceInputError, match="options"):
        genome.infer_genomes([META], setup["root"] / "model", out, **setup["common"], window=20, progress=False,
                             log=lambda _: None)


def test_bad_inputs_are_one_line_errors(setup, tmp_path, capsys):
    with gzip.open(META, "rt") as handle:
        record = next(SeqIO.parse(handle, "genbank"))
    record.features = [SeqFeature(FeatureLocation(0, 30, 1), type="source")]
    empty = tmp_path / "no_cds.gbk"
    SeqIO.write(record, empty, "genbank")
    with pytest.raises(genome.InferenceInputError, match=r"no_cds\.gbk: no CDS"):
        genome.infer_genomes([empty], setup["root"] / "model", tmp_path / "a", **setup["common"], progress=False)
    wide = create_model(setup["model"].config.replace(emb_dim=321), seed=0)  # an ESM2-8M-sized model
    checkpoint.save_model(tmp_path / "wide", wide)
    (tmp_path / "wide" / "normalization.npz").write_bytes((setup["root"] / "model" / "normalization.npz").read_bytes())
    for argv, message in (([str(empty), "--checkpoint", str(setup["root"] / "model")], "no_cds.gbk: no CDS"),
                          ([str(META), "--checkpoint", str(tmp_path / "wide")], "emb_dim 321")):
        code = cli.main(["infer", *argv, "--output", str(tmp_path / "b"), "--store", str(setup["common"]["store_dir"]),
                         "--esm2-model", str(setup["esm2"]), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("glm-jax infer: error: ") and message in err[0]
    assert "wide" in err[0] and "glm_config.json" in err[0]
    assert not (tmp_path / "b").exists()  # nothing written on bad input


def test_shards_input_gives_the_rows_of_their_windows(setup, run8, tmp_path):
    """make-shards output (non-overlapping windows, short tails dropped) -> one row per gene in a
    window, each equal to forward on its shard window."""
    from glm_jax.data import make_shards, shards
    from glm_jax.data.windows import WindowConfig
    store = protein_embed.EmbeddingStore(setup["common"]["store_dir"])
    make_shards.make_shards([META], tmp_path / "shards", lambda _: store, transform=setup["transform"],
                            window=WindowConfig(30), eval_fraction=0.3, split_by="window", num_shards=1,
                            progress=False, log=lambda _: None)
    out = genome.infer_genomes([], setup["root"] / "model", tmp_path / "out", shards_dir=tmp_path / "shards",
                               progress=False, log=lambda _: None)
    genes = genome.read_gene_table(out)
    windows = shards.read_shards(tmp_path / "shards", split="eval")
    assert len(genes) == int(windows["attention_mask"].sum()) + int(
        shards.read_shards(tmp_path / "shards", split="train")["attention_mask"].sum())
    direct = forward(setup["model"], {"inputs_embeds": windows["inputs_embeds"][:2],
                                      "attention_mask": windows["attention_mask"][:2]})
    for w in range(2):
        contig = windows["contig_id"][w].decode().rsplit("_", 1)[0]
        start, size = int(windows["window_start"][w]), int(windows["attention_mask"][w].sum())
        rows = genes[(genes["contig"] == contig) & genes["position"].between(start, start + size - 1)]
        assert list(rows["gene_id"]) == [g.decode() for g in windows["gene_ids"][w, :size]]
        np.testing.assert_allclose(np.stack(rows["embedding"].to_numpy()), direct["last_hidden_state"][w, :size],
                                   atol=2e-5)


def test_training_workdir_finds_its_features_and_esm2(setup, tmp_path):
    """What `launch/quickstart.sh` leaves: WORKDIR/config.json names the make-shards directory
    relative to where training ran; it is found from any working directory."""
    workdir, dataset = tmp_path / "runs" / "q" / "train", tmp_path / "runs" / "q" / "shards"
    workdir.mkdir(parents=True)
    dataset.mkdir()
    (workdir / "config.json").write_text(json.dumps({"data": {"train_pattern": "runs/q/shards"}}))
    setup["transform"].save(dataset / "normalization.npz")
    (dataset / "dataset_info.json").write_text(json.dumps({"esm2": {"model_dir": str(setup["esm2"]), "layer": 2}}))
    transform, source, info = genome.resolve_features(workdir, None)
    assert source == str(dataset / "normalization.npz") and info["esm2"]["layer"] == 2
    np.testing.assert_array_equal(transform.pca_components, setup["transform"].pca_components)
    assert inputs.default_esm2_dir(info) == setup["esm2"]
    with pytest.raises(genome.InferenceInputError, match="--features"):
        genome.resolve_features(tmp_path / "runs", None)
