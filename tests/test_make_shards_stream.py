"""Streaming make-shards: the same windows with the same content per split as the code before it
(golden), across processes, after a lost host, and on bad input. Embeddings are a hash of each
sequence (`HashStore`) except where the ESM2 store itself is under test (tiny random ESM2)."""
from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest

from glm_jax.data import features
from glm_jax.data import make_shards as pipeline
from glm_jax.data import shards

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


class HashStore:
    """Deterministic float16 'embeddings' per sequence (a seeded normal draw), anisotropic so a PCA
    is meaningful; `requested` records what each embed call asked for."""

    def __init__(self, dim=EMB_DIM):
        self.dim, self.requested = dim, []

    def __call__(self, sequences):
        self.requested.append(list(sequences))
        return self

    def get(self, sequences):
        def one(sequence):
            rng = np.random.default_rng(int.from_bytes(hashlib.sha256(sequence.encode()).digest()[:8], "little"))
            return rng.normal(size=self.dim) * np.linspace(3, 0.2, self.dim) + 1
        return np.array([one(s) for s in sequences], np.float16).reshape(len(sequences), self.dim)


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
    pipeline.make_shards(SHIPPED, tmp_path, HashStore(), transform=fixed_transform(), **GOLDEN_VARIANTS[variant])
    got, want = window_digests(tmp_path), _golden()[variant]
    assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in want.items()}
    for split in want:
        assert got[split] == want[split], split
    assert not (tmp_path / ".make-shards").exists()  # the work folder is gone once the dataset is complete


def test_fitted_normalisation_matches_the_golden(tmp_path):
    """Fitting streams over the hash partitions: the same numbers up to float64 summation order."""
    store = HashStore()
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
