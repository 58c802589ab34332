"""TFRecord shards: write/read round trip, tfds, deterministic shuffling, exact resume, per-host
sharding, corrupt shards; the same reader contract for InMemoryWindows."""
import os
import subprocess
import sys

import numpy as np
import pytest

from glm_jax.data import shards

from helpers import SHARD_EMB_DIM as E, SHARD_GENES as S, SHARD_NUM_PC as K
from helpers import random_shard_records, write_shard_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    arrays = random_shard_records(50)
    stats = write_shard_dataset(out, arrays, num_shards=8)
    return out, arrays, stats


def test_round_trip_identical_arrays(dataset):
    out, arrays, stats = dataset
    assert [s["file"] for s in stats] == [f"train-{i:05d}-of-00008.tfrecord" for i in range(8)]
    assert [s["num_windows"] for s in stats] == [7, 7, 6, 6, 6, 6, 6, 6]  # round-robin
    back = shards.read_shards(out)
    order = np.argsort(back["window_index"])
    np.testing.assert_array_equal(back["window_index"][order], arrays["window_index"])
    for key in ("inputs_embeds", "labels", "attention_mask", "prot_ids", "window_start"):
        np.testing.assert_array_equal(back[key][order], arrays[key].astype(back[key].dtype), err_msg=key)
    assert back["inputs_embeds"].dtype == np.float32 and back["attention_mask"].dtype == np.int32
    assert [c.decode() for c in back["contig_id"][order]] == list(arrays["contig_id"])
    assert back["gene_ids"][order][0, 0] == b"g0_0"


def test_tfds_builder_reads_the_shards_in_place(dataset):
    tfds = pytest.importorskip("tensorflow_datasets")
    out, arrays, _ = dataset
    builder = shards.tfds_builder(out)
    assert builder.info.splits["train"].num_examples == 50
    examples = list(tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)))
    examples.sort(key=lambda x: x["window_index"])
    for key in ("inputs_embeds", "labels", "protein_hash", "strand", "num_genes"):
        np.testing.assert_array_equal(np.stack([x[key] for x in examples]), arrays[key], err_msg=key)
    assert examples[0]["inputs_embeds"].dtype == np.float16
    assert examples[0]["gene_labels"][0] == b'{"is_phage":"1"}'


def test_float32_shards(tmp_path):
    arrays = random_shard_records(9, dtype=np.float32)
    write_shard_dataset(tmp_path, arrays, num_shards=2, dtype="float32")
    back = shards.read_shards(tmp_path)
    np.testing.assert_array_equal(back["labels"][np.argsort(back["window_index"])], arrays["labels"])


def epoch_indices(reader, batches):
    return [next(reader)["window_index"].tolist() for _ in range(batches)]


READERS = {
    "tfrecord": lambda data, **kw: shards.ShardReader(data[0], **kw),
    "memory": lambda data, **kw: shards.InMemoryWindows(data[1], **kw),
}


@pytest.mark.parametrize("kind", READERS)
def test_deterministic_shuffle_and_exact_resume(dataset, kind):
    make = lambda **kw: READERS[kind](dataset, batch_size=4, **kw)
    reference = epoch_indices(make(seed=3), 40)  # 160 windows: more than 3 epochs of 50
    assert reference == epoch_indices(make(seed=3), 40)
    assert reference != epoch_indices(make(seed=4), 40)
    flat = sum(reference, [])
    assert sorted(flat[:50]) == list(range(50)) and flat[:50] != flat[50:100]  # an epoch is a permutation, reshuffled
    for stop in (1, 12, 13, 25):  # resume inside an epoch, at and across its boundary
        reader = make(seed=3)
        epoch_indices(reader, stop)
        state = reader.state()
        assert state["consumed"] == 4 * stop
        resumed = make(seed=3)
        resumed.restore(state)
        assert epoch_indices(resumed, 40 - stop) == reference[stop:]
    with pytest.raises(ValueError, match="does not match"):
        make(seed=5).restore(state)


@pytest.mark.parametrize("kind", READERS)
@pytest.mark.parametrize("hosts", [2, 4])
def test_per_host_disjoint_and_complete(dataset, kind, hosts):
    seen = []
    for host in range(hosts):
        reader = READERS[kind](dataset, batch_size=3, num_epochs=1, drop_remainder=False,
                               process_index=host, process_count=hosts, seed=1)
        seen.append(sorted(i for batch in reader for i in batch["window_index"].tolist()))
        assert len(seen[-1]) == reader.examples_per_epoch
    flat = sum(seen, [])
    assert sorted(flat) == list(range(50)) and len(set(flat)) == 50


@pytest.mark.parametrize("kind", READERS)
def test_finite_epochs_and_remainder(dataset, kind):
    make = lambda **kw: READERS[kind](dataset, batch_size=8, num_epochs=2, **kw)
    sizes = [len(b["window_index"]) for b in make(drop_remainder=False)]
    assert sum(sizes) == 100 and sizes[-1] == 100 % 8
    assert [len(b["window_index"]) for b in make(drop_remainder=True)] == [8] * (100 // 8)
    batch = next(make(shuffle=False))
    assert batch["inputs_embeds"].shape == (8, S, E) and batch["labels"].shape == (8, S, K)
    assert batch["inputs_embeds"].dtype == np.float32 and batch["prot_ids"].dtype == np.int32


def test_truncated_and_corrupt_shards_are_named(dataset, tmp_path):
    arrays = dataset[1]
    write_shard_dataset(tmp_path, arrays, num_shards=4)
    victim = tmp_path / "train-00002-of-00004.tfrecord"
    data = victim.read_bytes()
    victim.write_bytes(data[:-100])
    with pytest.raises(shards.ShardError, match=r"train-00002-of-00004.tfrecord: truncated or corrupt shard"):
        shards.ShardReader(tmp_path, batch_size=4)
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0xFF  # same size, bad checksum
    victim.write_bytes(bytes(corrupted))
    reader = shards.ShardReader(tmp_path, batch_size=4, shuffle=False, num_epochs=1)
    with pytest.raises(shards.ShardError, match=r"train-00002-of-00004.tfrecord: corrupt or truncated shard"):
        list(reader)
    with pytest.raises(shards.ShardError, match="cannot feed 8 hosts"):
        shards.ShardReader(tmp_path, batch_size=4, process_count=8, process_index=0)


def test_in_memory_accepts_the_original_batch(shared_data):
    reader = shards.InMemoryWindows.from_npz(shared_data / "reference/batch.npz", batch_size=2, shuffle=False)
    batch = next(reader)
    reference = np.load(shared_data / "reference/batch.npz")
    np.testing.assert_array_equal(batch["inputs_embeds"], reference["embeds"].astype(np.float32))
    np.testing.assert_array_equal(batch["prot_ids"], reference["prot_ids"])
    assert batch["attention_mask"].dtype == np.int32


def test_choose_num_shards():
    assert shards.choose_num_shards(10, 25_000) == 8
    assert shards.choose_num_shards(100_000, 25_000, multiple_of=8) == 24  # 2.5 GB / 128 MB = 19 -> 24
    assert shards.choose_num_shards(100_000, 25_000, multiple_of=6) == 24
    assert shards.choose_num_shards(10, 25_000, multiple_of=12) == 12


def test_modules_import_without_tensorflow():
    """The GPU machine has no TensorFlow: everything but the TFRecord functions must work without it."""
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
            "import numpy as np\n"
            "from glm_jax.data import genomes, windows, features, shards, make_shards\n"
            "r = shards.InMemoryWindows({'embeds': np.zeros((3, 2, 4)), 'label_embeds': np.zeros((3, 2, 2)),"
            " 'attention_mask': np.ones((3, 2))}, batch_size=2)\n"
            "assert next(r)['inputs_embeds'].shape == (2, 2, 4)\n")
    env = {**os.environ, "PYTHONPATH": str(shards.pathlib.Path(shards.__file__).parents[2])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("kind", READERS)
def test_every_shard_is_reshuffled_every_epoch(dataset, kind):
    """Epoch e's order depends on (seed, e) inside each shard too, not only in the shard order:
    window w lives in shard w % 8 (round-robin), so each shard's windows are compared across
    epochs in the order they come. InMemoryWindows has no shards; the same check applies."""
    reader = READERS[kind](dataset, batch_size=5, seed=3)  # 50 windows: 10 batches per epoch
    epochs = [sum(epoch_indices(reader, 10), []) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(50))  # every window exactly once per epoch
    for a, b in ((0, 1), (1, 2), (0, 2)):
        reshuffled = [[w for w in epochs[a] if w % 8 == shard] != [w for w in epochs[b] if w % 8 == shard]
                      for shard in range(8)]
        assert sum(reshuffled) >= 6, (a, b, reshuffled)  # a shard of 6-7 keeps its order with p ~ 1/720
    again = READERS[kind](dataset, batch_size=5, seed=3)
    again.restore({**reader.state(), "consumed": 50})  # epoch 1 from its start, in a fresh reader
    assert sum(epoch_indices(again, 10), []) == epochs[1]
