"""Checkpoints across process counts: the readers' position is global (any process count resumes
it), and a checkpoint written by 2 processes restores in 1 process (training, `glm-jax forward`)
and in 4 processes on other meshes, the continued run equal to an uninterrupted one.

How the runs are made comparable: they read one .npz with `trainer.open_reader` (InMemoryWindows),
whose global batches are the same for any process count (each epoch one seeded permutation of all
windows, host p taking rows [p*b, (p+1)*b) of each global batch); masks and dropout come from the
step's key over the global batch. Only the float reduction order differs between meshes.
"""
from __future__ import annotations

import shutil
import sys

import jax
import numpy as np
import pytest

from helpers import random_shard_records, random_windows, tiny_config, write_shard_dataset
from multiprocess import run_processes

from glm_jax.data import shards
from glm_jax.errors import CheckpointError
from glm_jax.model.checkpoint import params_as_dict
from glm_jax.train import metrics_log
from glm_jax.train import trainer
from glm_jax.train.checkpoint import load_model_from_workdir


def hosts(make, count: int, **kwargs) -> list:
    return [make(process_index=p, process_count=count, **kwargs) for p in range(count)]


def windows_of(reader, batches: int) -> list[int]:
    return [int(w) for _ in range(batches) for w in next(reader)["window_index"]]


def global_batches(readers, batches: int) -> list[list[int]]:
    """The global batches the hosts' readers make together (host p's rows after host p-1's)."""
    per_host = [[next(r)["window_index"].tolist() for _ in range(batches)] for r in readers]
    return [sum((host[i] for host in per_host), []) for i in range(batches)]


# --- the readers' position ------------------------------------------------------------------------

ARRAYS = random_windows(40, 5, 3, seed=2, genes=4)


def memory(**kwargs):
    return shards.InMemoryWindows(ARRAYS, seed=7, **kwargs)


def test_in_memory_global_batches_are_the_same_for_any_process_count():
    reference = global_batches([memory(batch_size=8)], 12)  # 96 windows: more than 2 epochs of 40
    for count in (2, 4):
        assert global_batches(hosts(memory, count, batch_size=8 // count), 12) == reference


@pytest.mark.parametrize("resume_on", [1, 4])
def test_in_memory_position_of_2_processes_resumes_exactly_on_another_count(resume_on):
    reference = global_batches([memory(batch_size=8)], 12)
    writers = hosts(memory, 2, batch_size=4)
    global_batches(writers, 7)  # into the second epoch
    state = writers[0].state()
    assert state == writers[1].state()  # the same global position on every host
    readers = hosts(memory, resume_on, batch_size=8 // resume_on)
    for reader in readers:
        reader.restore({**state, "process_index": 1})
    assert global_batches(readers, 5) == reference[7:]


def test_in_memory_position_of_an_older_multi_process_run_is_refused():
    older = {"consumed": 8, "seed": 7, "shuffle": True, "batch_size": 4, "process_index": 0, "process_count": 2,
             "examples_per_epoch": 20}
    with pytest.raises(CheckpointError, match="written by 2 processes with an older glm-jax"):
        memory(batch_size=8).restore(older)
    single = {**older, "process_count": 1, "batch_size": 8, "examples_per_epoch": 40}
    reader = memory(batch_size=8)
    reader.restore(single)  # a one-process state of before: the same meaning today
    assert windows_of(reader, 1) == global_batches([memory(batch_size=8)], 2)[1]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """48 windows in 8 shards of 6 (window w in shard w % 8)."""
    out = tmp_path_factory.mktemp("shards")
    write_shard_dataset(out, random_shard_records(48), num_shards=8)
    return out


def shard_reader(shard_dir, **kwargs):
    return shards.ShardReader(shard_dir, seed=3, **kwargs)


def check_continues_the_epoch(readers, seen: list[int], count: int):
    """Each host first reads its shards' windows not yet seen in the epoch, then a whole new epoch of them."""
    for p, reader in enumerate(readers):
        mine = {w for w in range(48) if w % 8 % count == p}
        unseen = mine - set(seen)
        stream = windows_of(reader, (len(unseen) + len(mine)) // reader.batch_size)
        assert set(stream[:len(unseen)]) == unseen and len(set(stream[:len(unseen)])) == len(unseen)
        assert sorted(stream[len(unseen):]) == sorted(mine)


@pytest.mark.parametrize("resume_on", [1, 4])
def test_shard_position_of_2_processes_resumes_the_epoch_on_another_count(shard_dir, resume_on):
    writers = hosts(lambda **kw: shard_reader(shard_dir, **kw), 2, batch_size=4)
    seen = [w for r in writers for w in windows_of(r, 3)]  # 24 of the epoch's 48 windows
    assert len(set(seen)) == 24
    readers = hosts(lambda **kw: shard_reader(shard_dir, **kw), resume_on, batch_size=8 // resume_on)
    for reader in readers:
        reader.restore(writers[0].state())
    check_continues_the_epoch(readers, seen, resume_on)


def test_shard_position_survives_two_changes_of_the_process_count(shard_dir):
    make = lambda **kw: shard_reader(shard_dir, **kw)
    first = hosts(make, 2, batch_size=4)
    seen = [w for r in first for w in windows_of(r, 1)]
    second = hosts(make, 4, batch_size=2)
    for reader in second:
        reader.restore(first[0].state())
    seen += [w for r in second for w in windows_of(r, 1)]
    assert len(set(seen)) == 16
    last = shard_reader(shard_dir, batch_size=8)
    last.restore(second[0].state())
    check_continues_the_epoch([last], seen, 1)


def test_shard_position_on_the_same_count_is_exact(shard_dir):
    make = lambda **kw: shard_reader(shard_dir, **kw)
    reference = [windows_of(r, 9) for r in hosts(make, 2, batch_size=4)]  # 36 per host: into epoch 1
    writers = hosts(make, 2, batch_size=4)
    for r in writers:
        windows_of(r, 4)
    resumed = hosts(make, 2, batch_size=4)
    for r in resumed:
        r.restore(writers[0].state())
    assert [windows_of(r, 5) for r in resumed] == [ref[16:] for ref in reference]


# --- training: 2 processes -> 1 and -> 4 ---------------------------------------------------------

STEPS, GLOBAL_BATCH = 4, 16
TRAIN_SCRIPT = """
import sys
from glm_jax import distributed
distributed.initialize()
from helpers import tiny_config
from glm_jax.train import trainer
npz, workdir, steps, data, fsdp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
config = tiny_config(steps=steps, mesh=(data, fsdp, 1))
config.data.train_pattern = npz
result = trainer.train_and_evaluate(config, workdir, progress=False)
print(f"finished at step {result.step}", flush=True)
"""


def config_for(npz, steps: int, mesh):
    config = tiny_config(steps=steps, mesh=mesh)
    config.data.train_pattern = str(npz)
    assert config.train.batch_size == GLOBAL_BATCH
    return config


def train_here(npz, workdir, steps: int, mesh=(4, 2, 1)):
    """One process, the first prod(mesh) of this pytest process's 8 devices."""
    devices = jax.devices()[:int(np.prod(mesh))]
    return trainer.train_and_evaluate(config_for(npz, steps, mesh), workdir, devices=devices, progress=False)


def train_processes(npz, workdir, steps: int, processes: int, devices_per_process: int, mesh):
    result = run_processes([sys.executable, "-c", TRAIN_SCRIPT, str(npz), str(workdir), str(steps), str(mesh[0]),
                            str(mesh[1])], processes=processes, devices_per_process=devices_per_process)
    assert result.codes == [0] * processes, result
    assert f"finished at step {steps}" in result.logs[0], result


def losses(workdir) -> list[float]:
    return [r["loss"] for r in metrics_log.read_metrics(workdir, "train")]


def assert_params_close(a: dict, b: dict):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 1-process reference of STEPS steps, and STEPS/2 steps by 2 processes x 2 devices."""
    root = tmp_path_factory.mktemp("counts")
    npz = root / "windows.npz"
    np.savez(npz, **random_windows(64, 33, 12, seed=11))
    train_here(npz, root / "reference", STEPS)
    train_processes(npz, root / "two", STEPS // 2, processes=2, devices_per_process=2, mesh=(2, 2, 1))
    return npz, root


@pytest.mark.multiprocess
def test_a_2_process_checkpoint_loads_in_one_process_for_inference(runs, tmp_path, capsys):
    from glm_jax.cli import main as cli

    npz, root = runs
    model = load_model_from_workdir(root / "two")
    assert_params_close(params_as_dict(model), params_as_dict(load_model_from_workdir(root / "reference", step=2)))
    batch = tmp_path / "batch.npz"
    arrays = random_windows(3, 33, 12, seed=4)
    np.savez(batch, inputs_embeds=arrays["inputs_embeds"], attention_mask=arrays["attention_mask"])
    assert cli.main(["forward", "--checkpoint", str(root / "two"), "--input", str(batch),
                     "--output", str(tmp_path / "out.npz")]) == 0, capsys.readouterr().err
    assert np.isfinite(np.load(tmp_path / "out.npz")["last_hidden_state"]).all()


@pytest.mark.multiprocess
def test_a_2_process_checkpoint_resumes_in_one_process_on_another_mesh(runs, tmp_path):
    npz, root = runs
    workdir = tmp_path / "one"
    shutil.copytree(root / "two", workdir)
    result = train_here(npz, workdir, STEPS, mesh=(8, 1, 1))
    np.testing.assert_allclose(losses(workdir), losses(root / "reference"), rtol=1e-5)
    assert_params_close(jax.device_get(result.state.params),
                        params_as_dict(load_model_from_workdir(root / "reference")))


@pytest.mark.multiprocess
def test_a_2_process_checkpoint_resumes_in_4_processes_on_another_mesh(runs, tmp_path):
    npz, root = runs
    workdir = tmp_path / "four"
    shutil.copytree(root / "two", workdir)
    train_processes(npz, workdir, STEPS, processes=4, devices_per_process=2, mesh=(2, 4, 1))
    np.testing.assert_allclose(losses(workdir), losses(root / "reference"), rtol=1e-5)
    assert_params_close(params_as_dict(load_model_from_workdir(workdir)),
                        params_as_dict(load_model_from_workdir(root / "reference")))
