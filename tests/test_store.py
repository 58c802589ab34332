"""Embedding store format 2: parts per writer, the sorted hash index, killed writers, live writers,
parts of another model, format-1 stores, and `embed-proteins --distributed` against one process."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from glm_jax.cli import main as cli
from glm_jax.proteins import embed as pe
from glm_jax.proteins import store as st
from glm_jax.proteins import store_parts

TESTS = pathlib.Path(__file__).resolve().parent
FORMAT1 = TESTS / "data" / "format1_store"  # recorded with the format-1 code (commit d88c581)
FORMAT1_PROTEINS = ["MKTAYIAK", "MKV", "MSTNPKPQRKTKRNTNRRPQDVKFPGG", "MAAAK", "MDEFGHIKLMNPQRSTVWY"]
FORMAT1_EMBEDDINGS = [[-0.359619140625, 1.2041015625, 1.396484375, 0.317138671875],
                      [0.4140625, -0.489501953125, -0.9140625, -0.900390625],
                      [-0.99853515625, 0.92919921875, -0.056304931640625, 0.1282958984375],
                      [-0.64013671875, -1.087890625, -1.2021484375, -0.841796875],
                      [0.59912109375, 0.0184326171875, -0.456787109375, -0.2392578125]]
MODEL = {"fingerprint": "test", "dim": 8}


def random_rows(n, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**64, size=(n, 2), dtype=np.uint64), rng.normal(size=(n, dim)).astype(np.float16)


def test_parts_index_and_tail_find_every_row(tmp_path, monkeypatch):
    """Rows are found while being written (unindexed tail), after periodic folds into the sorted
    index and after close, across parts; keys sharing the high word are told apart by the low."""
    monkeypatch.setattr(store_parts, "TAIL_ROWS", 800)  # folds at 900 and 1800 rows: index + tail both in play
    monkeypatch.setattr(store_parts, "BLOCK_WORDS", 32)  # blocks of 10 entries: many, some equal high words across edges
    monkeypatch.setattr(store_parts, "LOOKUP_BATCH", 64)  # lookups in several batches of queries
    hashes, embeddings = random_rows(3000)
    hashes[1::37, 0] = hashes[0:-1:37, 0]  # pairs with equal high words
    store = st.EmbeddingStore(tmp_path / "s", model=MODEL)
    with store.writing("a") as part:
        for start in range(0, 2500, 300):
            stored = min(start + 300, 2500)
            part.append(hashes[start:stored], embeddings[start:stored])
            assert (store.locate(hashes[:stored])[1] == np.arange(stored)).all()
            assert (store.locate(hashes[stored:])[0] == -1).all()
        assert 0 < part.indexed < part.rows  # one fold happened, a tail remains
    with store.writing("b") as part:
        part.append(hashes[2500:], embeddings[2500:])
    reader = st.EmbeddingStore(tmp_path / "s")
    assert reader.parts == ["a", "b"] and len(reader) == 3000
    info = json.loads((tmp_path / "s" / "parts" / "a" / "part.json").read_text())
    assert (info["rows"], info["indexed"], info["index"]) == (2500, 2500, "index-000000002500.u64")
    assert sorted(p.name for p in (tmp_path / "s" / "parts" / "a").glob("*.u64")) == [
        "fences-000000002500.u64", "index-000000002500.u64", "keys.u64"]  # older index files deleted
    picked = np.random.default_rng(1).permutation(3000)[:800]
    np.testing.assert_array_equal(reader.get_hashes(hashes[picked]), embeddings[picked])
    np.testing.assert_array_equal(reader.hashes(), np.unique(hashes, axis=0))
    other, _ = random_rows(50, seed=2)
    assert (reader.locate(other)[0] == -1).all()
    with pytest.raises(KeyError, match="1 key"):
        reader.get_hashes(np.concatenate([hashes[:3], other[:1]]))


KILLED_WRITER = """
import os, signal, sys
import numpy as np
from glm_jax.proteins import store as st
hashes = np.load(sys.argv[2])
embeddings = np.load(sys.argv[3])
writer = st.PartWriter(__import__("pathlib").Path(sys.argv[1]), "p00000", {"fingerprint": "test", "dim": 8})
writer.append(hashes[:100], embeddings[:100])
writer.append(hashes[100:150], embeddings[100:150])
with open(writer.path / st.EMBEDDINGS_FILE, "ab") as handle:  # killed in the middle of an append
    handle.write(embeddings[150:160].tobytes()[:-7])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_writer_keeps_its_committed_rows(tmp_path):
    hashes, embeddings = random_rows(300)
    np.save(tmp_path / "h.npy", hashes)
    np.save(tmp_path / "e.npy", embeddings)
    st.EmbeddingStore(tmp_path / "s", model=MODEL)
    (tmp_path / "killed.py").write_text(KILLED_WRITER)
    run = subprocess.run([sys.executable, tmp_path / "killed.py", tmp_path / "s", tmp_path / "h.npy",
                          tmp_path / "e.npy"], capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    reader = st.EmbeddingStore(tmp_path / "s")  # the 150 committed rows, unindexed, read from the tail
    assert len(reader) == 150 and (reader.locate(hashes[150:])[0] == -1).all()
    np.testing.assert_array_equal(reader.get_hashes(hashes[:150]), embeddings[:150])
    with reader.writing() as part:  # the lock died with its process; the torn append is cut off
        assert (part.path / st.EMBEDDINGS_FILE).stat().st_size == 150 * 8 * 2
        part.append(hashes[150:], embeddings[150:])
    np.testing.assert_array_equal(st.EmbeddingStore(tmp_path / "s").get_hashes(hashes), embeddings)


def test_format1_store_is_read_in_place_and_converted(tmp_path, capsys):
    """The store recorded by the format-1 code: read as it is, converted by the command (also after
    a conversion killed half-way) or by opening it to write, with the same embeddings."""
    expected = np.array(FORMAT1_EMBEDDINGS, np.float16)
    shutil.copytree(FORMAT1, tmp_path / "f1")
    old = st.EmbeddingStore(tmp_path / "f1")
    assert old.format == 1 and len(old) == 5 and "MKV" in old and "MKW" not in old
    np.testing.assert_array_equal(old.get(FORMAT1_PROTEINS[::-1]), expected[::-1])
    with pytest.raises(st.InputError, match="format-1 store"):
        old.add(["MKW"], np.zeros((1, 4)))
    (tmp_path / "f1" / "parts" / "format1").mkdir(parents=True)  # left by a conversion killed before its switch
    (tmp_path / "f1" / "parts" / "format1" / "keys.u64").write_bytes(b"\0" * 40)
    assert cli.main(["convert-store", str(tmp_path / "f1")]) == 0
    assert "converted 5 embeddings to format 2" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "f1").iterdir()) == [".convert.lock", "manifest.json", "parts"]
    new = st.EmbeddingStore(tmp_path / "f1")
    assert new.format == 2 and new.parts == ["format1"] and len(new) == 5
    np.testing.assert_array_equal(new.get(FORMAT1_PROTEINS), expected)
    assert cli.main(["convert-store", str(tmp_path / "f1")]) == 0 and "already format 2" in capsys.readouterr().out
    # a run that writes converts first, then appends to its own part
    shutil.copytree(FORMAT1, tmp_path / "f1b")
    model = json.loads((FORMAT1 / "manifest.json").read_text())["model"]
    writer = st.EmbeddingStore(tmp_path / "f1b", model=model)
    writer.add(["MKW"], np.ones((1, 4)))
    reread = st.EmbeddingStore(tmp_path / "f1b")
    assert reread.parts == ["format1", "p00000"] and len(reread) == 6
    np.testing.assert_array_equal(reread.get(FORMAT1_PROTEINS + ["MKW"]), np.concatenate([expected, np.ones((1, 4))]))
    assert cli.main(["convert-store", str(tmp_path / "nothing")]) == 2
    assert "not an embedding store" in capsys.readouterr().err


def test_live_writer_and_part_of_another_model_are_one_line_errors(tiny_esm2_dir, tmp_path, capsys):
    (tmp_path / "p.fa").write_text(">a\nMKTAYIAK\n>b\nMKV\n")
    argv = ["embed-proteins", str(tmp_path / "p.fa"), "--store", str(tmp_path / "s"), "--model", str(tiny_esm2_dir),
            "--quiet"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    (tmp_path / "p.fa").write_text(">a\nMKTAYIAK\n>c\nMSTNPKPQRK\n")
    store = st.EmbeddingStore(tmp_path / "s")
    holder = st.PartWriter(store.path, "p00000", store.model)  # another run, alive, writing p00000
    try:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{tmp_path / 's' / 'parts' / 'p00000'} is being written by another live run" \
            f" (pid {os.getpid()} on" in err and "Traceback" not in err
        assert "MSTNPKPQRK" not in st.EmbeddingStore(tmp_path / "s")  # nothing written
        assert cli.main(argv + ["--writer", "second"]) == 0  # its own part: runs beside the live writer
        assert "1 already stored, 1 newly embedded" in capsys.readouterr().out
    finally:
        holder.close()
    assert st.EmbeddingStore(tmp_path / "s").parts == ["p00000", "second"]
    # a part that another model wrote (copied in, or a host run with another --model)
    shutil.copytree(tmp_path / "s" / "parts" / "second", tmp_path / "s" / "parts" / "intruder")
    info = json.loads((tmp_path / "s" / "parts" / "intruder" / "part.json").read_text())
    info["model"]["layer"] = 1
    (tmp_path / "s" / "parts" / "intruder" / "part.json").write_text(json.dumps(info))
    with pytest.raises(st.StoreModelError, match=r"parts/intruder holds embeddings of another model .*layer: "
                                                 r"store has 1, this run 2"):
        st.EmbeddingStore(tmp_path / "s")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "s" / "parts" / "intruder") in err


DISTRIBUTED_RUN = """
import os, signal, sys
from glm_jax.cli import main as cli
from glm_jax.proteins import embed as pe
from helpers import decode_token_rows

log, process = sys.argv[1], os.environ["GLM_JAX_PROCESS_ID"]
kill_at = int(os.environ.get("KILL_PROCESS_1_AT_LAUNCH", "0"))
launch, launched = pe.Esm2Embedder.launch, []

def logged_launch(self, tokens):
    launched.append(1)
    if process == "1" and len(launched) == kill_at:  # its earlier batches are stored, one is in flight
        os.kill(os.getpid(), signal.SIGKILL)
    with open(f"{log}.{process}", "a") as handle:
        handle.write("".join(s + "\\n" for s in decode_token_rows(tokens)))
    return launch(self, tokens)

pe.Esm2Embedder.launch = logged_launch
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.multiprocess
def test_two_processes_equal_one_and_a_killed_host_reruns_only_its_missing_proteins(tiny_esm2_dir, tmp_path):
    """embed-proteins --distributed on 2 processes: process 1 is SIGKILLed mid-run (the launcher
    then stops process 0, as srun would); the rerun embeds exactly the proteins missing from the
    store, each once; the result has the 1-process store's keys and embeddings, bit for bit."""
    from multiprocess import run_processes

    rng = np.random.default_rng(20)  # short proteins: few batch shapes to compile in each process
    proteins = ["M" + "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), rng.integers(10, 60))) for _ in range(24)]
    (tmp_path / "p.fa").write_text("".join(f">p{i}\n{s}\n" for i, s in enumerate(proteins + proteins[:3])))
    common = [str(tmp_path / "p.fa"), "--model", str(tiny_esm2_dir), "--max-tokens", "128", "--quiet"]
    assert cli.main(["embed-proteins", *common, "--store", str(tmp_path / "one")]) == 0
    one = st.EmbeddingStore(tmp_path / "one")

    (tmp_path / "run.py").write_text(DISTRIBUTED_RUN)
    command = [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "killed"), "embed-proteins", *common,
               "--store", str(tmp_path / "two"), "--distributed"]
    killed = run_processes(command, processes=2, env={"KILL_PROCESS_1_AT_LAUNCH": "3"})
    assert killed.codes[1] == 128 + signal.SIGKILL and killed.codes[0] != 0, killed
    after_kill = st.EmbeddingStore(tmp_path / "two")
    missing = set(after_kill.missing(proteins))
    assert after_kill.parts == ["p00000", "p00001"] and 0 < len(missing) < len(proteins)

    rerun = run_processes(command[:2] + [str(tmp_path / "rerun")] + command[3:], processes=2)
    assert rerun.codes == [0, 0], rerun
    relaunched = [s for i in range(2) if (tmp_path / f"rerun.{i}").exists()
                  for s in (tmp_path / f"rerun.{i}").read_text().split()]
    assert sorted(relaunched) == sorted(missing)  # each missing protein once, nothing stored redone
    assert any(f"{tmp_path / 'two'}: {len(proteins)} embeddings in parts p00000, p00001" in line
               for line in rerun.logs[0].splitlines())
    two = st.EmbeddingStore(tmp_path / "two")
    np.testing.assert_array_equal(two.hashes(), one.hashes())
    assert len(two) == len(proteins)
    np.testing.assert_array_equal(two.get_hashes(one.hashes()).view(np.uint16),
                                  one.get_hashes(one.hashes()).view(np.uint16))
    shares = st.share_of(st.sequence_hashes(proteins), 2)
    for index, name in enumerate(two.parts):  # each process wrote exactly its share
        part = two._parts[index]
        assert sorted(map(tuple, part.hashes())) == sorted(map(tuple, st.sequence_hashes(
            [p for p, s in zip(proteins, shares) if s == index])))


def test_embed_proteins_reads_its_input_in_chunks(tiny_esm2_dir, tmp_path, monkeypatch):
    """A generator input is drawn one chunk at a time (the first batch runs before the second
    chunk is read); sequences stored earlier, or earlier in the run, are not embedded again."""
    from helpers import decode_token_rows

    rng = np.random.default_rng(3)
    proteins = ["M" + "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), rng.integers(10, 40))) for _ in range(12)]
    pe.embed_proteins(proteins[:3], tmp_path / "s", tiny_esm2_dir, max_tokens=128, progress=False)
    drawn, launched = [], []

    def stream():
        for sequence in proteins + proteins[3:5]:  # the last chunk repeats two embedded in chunk 1
            drawn.append(sequence)
            yield sequence

    launch = pe.Esm2Embedder.launch
    monkeypatch.setattr(pe.Esm2Embedder, "launch",
                        lambda self, tokens: launched.append((len(drawn), decode_token_rows(tokens))) or launch(self, tokens))
    store = pe.embed_proteins(stream(), tmp_path / "s", tiny_esm2_dir, max_tokens=128, progress=False, chunk_size=5)
    assert launched[0][0] == 5  # only the first chunk had been read
    assert sorted(s for _, rows in launched for s in rows) == sorted(proteins[3:])
    assert (store.last_run.proteins, store.last_run.embedded, store.last_run.already_stored) == (14, 9, 3)
    whole = pe.embed_proteins(proteins, tmp_path / "whole", tiny_esm2_dir, max_tokens=128, progress=False)
    np.testing.assert_allclose(store.get(proteins), whole.get(proteins), rtol=0, atol=2e-3)


def test_store_lookup_benchmark_runs_on_a_small_store(tmp_path):
    """benchmarks/store_lookup.measure_store_get (the data_pipeline case's store numbers): builds,
    looks up in a fresh process (values checked there), reports, and deletes the store."""
    sys.path.insert(0, str(TESTS.parent))
    from benchmarks import store_lookup

    result = store_lookup.measure_store_get(3000, dim=16, keys=100, work_dir=tmp_path)
    assert (result["rows"], result["dim"], result["keys"], result["kind"]) == (3000, 16, 100, "format2")
    assert result["get_cold_s"] > 0 and result["get_warm_s"] > 0 and result["peak_rss_mib"] >= result["rss_before_mib"]
    assert result["store_gb"] > 3000 * 16 * 2 / 1e9 and not list(tmp_path.iterdir())
    assert store_lookup.sequence(0) == "MA" and store_lookup.sequence(21) == "MCC"
