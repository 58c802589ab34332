"""Streaming make-shards: the same windows with the same content per split as the code before it
(golden), across processes, after a lost host, and on bad input. Embeddings are a hash of each
sequence (`helpers.HashEmbeddings`) except where the ESM2 store itself is under test (tiny random ESM2)."""
from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest

from glm_jax.data import features
from glm_jax.data import make_shards as pipeline
from glm_jax.data import shards
from helpers import HashEmbeddings

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
# the shipped genomes but the one-phage file, whose contig MW460250_1 is also in the 5-phage file
SHIPPED = [REPO / "data" / "genomes" / name for name in (
    "Neisseria_meningitidis_MC58.gb.gz", "Streptococcus_pyogenes_M1_GAS.gb.gz", "pharokka_meta_5phages.gbk.gz")]
EMB_DIM, NUM_COMPONENTS = 48, 12
QUIET = dict(progress=False, log=lambda *_: None)
# today's defaults (split by contig), and overlapping windows split by window
GOLDEN_VARIANTS = {"by_contig": dict(eval_fraction=0.2, seed=0, **QUIET),
                   "by_window_stride_20": dict(eval_fraction=0.2, seed=3, split_by="window",
                                               window=pipeline.WindowConfig(30, 12, 20), **QUIET)}


def fixed_transform(dim=EMB_DIM, k=NUM_COMPONENTS) -> features.FeatureTransform:
    """A seeded normalisation + orthonormal 'PCA', so record contents do not depend on fitting."""
    rng = np.random.default_rng(7)
    components = np.linalg.qr(rng.normal(size=(dim, k)))[0].T
    return features.FeatureTransform(rng.normal(size=dim), rng.uniform(0.5, 2, dim), rng.normal(size=dim) * 0.1,
                                     components, rng.uniform(0.5, 3, k))


def _digest(values) -> str:
    return hashlib.sha256(repr(list(values)).encode()).hexdigest()[:16]


def shard_records(path) -> list[dict]:
    """Every record of a TFRecord shard as {key: list of its int64 / bytes values}, straight from the
    tf.train.Example protos (independent of the readers)."""
    import tensorflow as tf
    records = []
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        example = tf.train.Example.FromString(raw)
        records.append({k: list(f.int64_list.value) or list(f.bytes_list.value)
                        for k, f in example.features.feature.items()})
    return records


def window_digests(out_dir) -> dict[str, dict[str, dict]]:
    """{split: {"<genome>\\t<contig_id>": every record field of that window, lists as digests}}."""
    out_dir = pathlib.Path(out_dir)
    info = shards.load_dataset_info(out_dir)
    result = {}
    for split, split_info in info["splits"].items():
        windows = {}
        for shard in split_info["shards"]:
            for record in shard_records(out_dir / shard["file"]):
                key = f"{record['genome'][0].decode()}\t{record['contig_id'][0].decode()}"
                assert key not in windows, key
                windows[key] = {name: values[0] if name in shards.SCALAR_INT_KEYS else _digest(values)
                                for name, values in record.items() if name not in shards.SCALAR_STRING_KEYS}
                windows[key]["first_prot_id"] = record["prot_ids"][0]
        result[split] = windows
    return result


def _golden() -> dict:
    return json.loads((GOLDEN / "make_shards_windows.json").read_text())


@pytest.mark.parametrize("variant", sorted(GOLDEN_VARIANTS))
def test_streaming_make_shards_writes_the_golden_windows(variant, tmp_path):
    """Every window of the shipped genomes lands in the same split with the same record (ids,
    place in the split, running prot_ids, proteins, strands, labels, features) as before streaming."""
    pipeline.make_shards(SHIPPED, tmp_path, HashEmbeddings(), transform=fixed_transform(), **GOLDEN_VARIANTS[variant])
    got, want = window_digests(tmp_path), _golden()[variant]
    assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in want.items()}
    for split in want:
        assert got[split] == want[split], split
    assert not (tmp_path / ".make-shards").exists()  # the work folder is gone once the dataset is complete


def test_fitted_normalisation_matches_the_golden(tmp_path):
    """Fitting streams over the hash partitions: the same numbers up to float64 summation order."""
    store = HashEmbeddings()
    pipeline.make_shards(SHIPPED, tmp_path, store, num_components=NUM_COMPONENTS, **GOLDEN_VARIANTS["by_contig"])
    assert len(store.requested) == 1 and len(store.requested[0]) == len(set(store.requested[0]))  # each protein once
    got = features.load_feature_transform(tmp_path / "normalization.npz")
    want = features.load_feature_transform(GOLDEN / "make_shards_normalization.npz")
    assert got.n_samples == want.n_samples == len(store.requested[0])
    for name in ("mean", "std", "pca_mean", "pca_components", "pca_explained_variance"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-9, atol=1e-12, err_msg=name)


def test_the_split_hashes_genome_and_contig_and_nothing_else():
    """Pins the split rule: sha256 of "genome<TAB>contig" (+ "<TAB>segment" by window) against
    eval_fraction; not the window's genes or start, not the other contigs."""
    from glm_jax.data.windows import Window

    def window(source, contig, index=0, start=0):
        return Window(source, contig, index, start, ())

    u = lambda key: int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2.0 ** 64  # noqa: E731
    for source, contig in [("a.gbk", "c1"), ("b.gbk", "c1"), ("a.gbk", "c2"), ("NC_003112.gb.gz", "NC_003112")]:
        for fraction in (0.1, 0.5, 0.9):
            expected = "eval" if u(f"{source}\t{contig}") < fraction else "train"
            assert pipeline.split_of(window(source, contig, 3, 90), fraction) == expected
            by_window = "eval" if u(f"{source}\t{contig}\t3") < fraction else "train"
            assert pipeline.split_of(window(source, contig, 3, 90), fraction, "window") == by_window
    # recorded values: both inputs matter
    assert [pipeline.split_of(window(s, c), 0.5) for s, c in [("a.gbk", "c1"), ("c.gbk", "c1"), ("a.gbk", "c2")]] \
        == ["eval", "train", "train"]


# --- several processes ---------------------------------------------------------------------------

MP_SCRIPT = REPO / "tests" / "scripts" / "mp_make_shards.py"
MP_GENOMES = [str(REPO / "data" / "genomes" / "pharokka_meta_5phages.gbk.gz")]


def _run_script(out, *extra, processes: int = 1):
    """mp_make_shards.py as one plain process, or as `processes` through `glm-jax launch-local`."""
    import os
    import subprocess
    import sys
    command = [sys.executable, str(MP_SCRIPT), str(out), *MP_GENOMES, *extra]
    if processes > 1:
        command = [sys.executable, "-m", "glm_jax.cli", "launch-local", "--processes", str(processes), "--", *command]
    env = os.environ | {"PYTHONPATH": str(REPO / "tests"), "GLM_JAX_HEARTBEAT_TIMEOUT": "10"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "shards"
    result = _run_script(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _shard_contents(out) -> dict[str, list[dict]]:
    """Every shard's records in file order (parsed: protobuf does not fix the byte order of a map)."""
    return {p.name: shard_records(p) for p in sorted(pathlib.Path(out).glob("*.tfrecord"))}


@pytest.mark.multiprocess
def test_two_processes_write_the_shards_of_one(one_process, tmp_path):
    """2 processes (each plans every window, embeds its protein partitions, writes its shards) ==
    1 process: the same records in the same order in every shard file, hence the same windows in the same splits."""
    result = _run_script(tmp_path, processes=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    embedded = [int(line.split()[-1]) for line in result.stdout.splitlines() if "embedded" in line.split()[1:2]]
    single = shards.load_dataset_info(one_process)
    assert len(embedded) == 2 and sum(embedded) == single["normalization"]["n_samples"]  # each protein once
    assert _shard_contents(tmp_path) == _shard_contents(one_process)
    assert window_digests(tmp_path) == window_digests(one_process)
    two = shards.load_dataset_info(tmp_path)
    assert two["processes"] == 2 and two["splits"] == single["splits"]
    assert (tmp_path / "normalization.npz").read_bytes() == (one_process / "normalization.npz").read_bytes()
    assert not (tmp_path / ".make-shards").exists()


@pytest.mark.multiprocess
def test_a_host_lost_while_writing_is_redone_alone(one_process, tmp_path):
    """Process 1 is killed while writing its shards: no dataset_info.json; the rerun keeps
    process 0's shards (files untouched) and both plans and embeddings, and rewrites process 1's."""
    killed = _run_script(tmp_path, "--die-at-get", "2", processes=2)
    assert killed.returncode != 0 and not (tmp_path / shards.INFO_FILE).exists()
    first_host = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*-0000[02468]-of-*.tfrecord")}
    assert first_host
    rerun = _run_script(tmp_path, processes=2)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "[p0] resuming: plan, embed, shards kept" in rerun.stdout
    assert "[p1] resuming: plan, embed kept" in rerun.stdout
    assert " embedded " not in rerun.stdout
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in first_host} == first_host
    assert _shard_contents(tmp_path) == _shard_contents(one_process)


# --- bad input: one line, nothing written ------------------------------------------------------

def _cli_make_shards(monkeypatch, *argv) -> int:
    from glm_jax.cli import main as cli
    monkeypatch.setattr(pipeline, "esm2_embedder", lambda *a, **k: (HashEmbeddings(), {"esm2": {}}))
    return cli.main(["make-shards", *map(str, argv), "--no-progress"])


def test_a_contig_table_naming_a_protein_the_fasta_lacks(tmp_path, monkeypatch, capsys):
    (tmp_path / "p.faa").write_text("".join(f">p{i}\nMKV{'L' * i}\n" for i in range(40)))
    rows = [f"c{c}\t" + ";".join(f"+p{c * 20 + i}" for i in range(20)) for c in range(2)]
    (tmp_path / "t.tsv").write_text("\n".join(rows).replace("+p33", "-p99") + "\n")
    out = tmp_path / "out"
    assert _cli_make_shards(monkeypatch, tmp_path / "p.faa", "--contig-table", tmp_path / "t.tsv", "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"t.tsv: line 2: contig 'c1' lists proteins not in {tmp_path / 'p.faa'}: ['p99']")
    assert len(err.splitlines()) == 1 and not out.exists()


def test_the_same_contig_id_in_two_files(shared_data, tmp_path, monkeypatch, capsys):
    genomes = [shared_data / "genomes/pharokka_SAOMS1_MW460250_standard.gbk.gz",
               shared_data / "genomes/pharokka_meta_5phages.gbk.gz"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("a file of the user's")
    assert _cli_make_shards(monkeypatch, *genomes, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{genomes[1]}: record 1 'MW460250_1': contig id already seen in {genomes[0]}; "
                        "contig ids must be unique over all inputs")
    assert len(err.splitlines()) == 1 and [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# --- the streaming parts -------------------------------------------------------------------------

def test_protein_partitions_hold_each_sequence_once_whatever_the_split(tmp_path):
    """Distinct sequences, first-seen order within a partition, partitions in order: the same set
    and order from one spill as from two spills that each keep half of the partitions; the spill
    writes its buffer out once it holds `buffer_bytes`."""
    from glm_jax.data import protein_set
    rng = np.random.default_rng(0)
    pool = ["M" + "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 20)) for _ in range(300)]
    stream = [pool[i] for i in rng.integers(0, 300, 2000)]
    whole = protein_set.ProteinSpill(tmp_path / "whole", num_partitions=7, buffer_bytes=500)
    halves = [protein_set.ProteinSpill(tmp_path / f"half{p}", 7, owned=lambda q, p=p: q % 2 == p, buffer_bytes=500)
              for p in range(2)]
    for i, sequence in enumerate(stream):
        for spill in [whole, *halves]:
            spill.add(sequence)
        if i == 100:
            assert list((tmp_path / "whole").glob("spill-*.txt"))  # flushed, not held
    one = whole.close()
    for half in halves:
        half.close()
    two = protein_set.ProteinSet([tmp_path / "half0", tmp_path / "half1"])
    assert list(one) == list(two) and sorted(one) == sorted(set(stream)) and len(one) == len(set(stream))
    for partition in one.partitions():  # first-seen order inside a partition
        assert partition == sorted(partition, key=stream.index)


def test_protein_fasta_in_table_order_is_read_without_holding_it(tmp_path):
    """The proteins of a FASTA in table order are read one contig ahead at most; out of order they
    are still found (held until their contig comes), and a protein on two contigs by a rescan."""
    from glm_jax.data import genomes
    (tmp_path / "p.faa").write_text("".join(f">p{i}\nMK{'V' * (i + 1)}\n" for i in range(30)))
    (tmp_path / "in_order.tsv").write_text("".join(f"c{c}\t" + ";".join(f"+p{c * 10 + i}" for i in range(10)) + "\n"
                                                   for c in range(3)))
    lookups = []
    original = genomes._ProteinLookup.get

    def spy(self, protein_id):
        lookups.append(len(self.pending))
        return original(self, protein_id)
    genomes._ProteinLookup.get = spy
    try:
        contigs = list(genomes.iter_contigs([tmp_path / "p.faa"], tmp_path / "in_order.tsv"))
    finally:
        genomes._ProteinLookup.get = original
    assert [len(c.genes) for c in contigs] == [10, 10, 10] and max(lookups) == 0
    (tmp_path / "shuffled.tsv").write_text("c0\t-p29;+p3\nc1\t+p3;+p0\n")
    contigs = list(genomes.iter_contigs([tmp_path / "p.faa"], tmp_path / "shuffled.tsv"))
    assert [[g.protein for g in c.genes] for c in contigs] == [["MK" + "V" * 30, "MKVVVV"], ["MKVVVV", "MKV"]]


def test_shard_writer_mixes_within_its_buffer(tmp_path):
    """Records routed to one shard come out as a fixed permutation of what went in (buffer 4),
    every record once; buffer 0 keeps the order."""
    from helpers import random_shard_records
    arrays = random_shard_records(40)
    orders = {}
    for name, buffer in [("mixed", 4), ("again", 4), ("plain", 0)]:
        with shards.ShardWriter(tmp_path / name, "train", 2, shards=[1], shuffle_buffer=buffer, seed=3) as writer:
            writer.write(arrays, [1] * 40)
        orders[name] = [r["window_index"][0] for r in shard_records(tmp_path / name / "train-00001-of-00002.tfrecord")]
    assert orders["plain"] == list(range(40)) and orders["mixed"] == orders["again"] != orders["plain"]
    assert sorted(orders["mixed"]) == list(range(40))
    with pytest.raises(ValueError, match="routed to shard 0"):
        shards.ShardWriter(tmp_path / "x", "train", 2, shards=[1]).write(arrays, [0] * 40)
