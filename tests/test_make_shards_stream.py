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
