"""Atomic writes (glm_jax/files.py): a failed write leaves the old file, or none, and no temporary."""
import numpy as np
import pytest

from glm_jax import files


def test_failed_write_leaves_no_file_and_no_temporary(tmp_path):
    def fail(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        files.atomic_write(tmp_path / "out.bin", fail)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = files.write_text_atomic(tmp_path / "a.json", "old")
    with pytest.raises(ValueError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("new, but the writer fails")
            raise ValueError("boom")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_savez_writes_exactly_the_given_path_and_creates_folders(tmp_path):
    path = files.savez_atomic(tmp_path / "deep" / "x.features", a=np.arange(3))
    assert path.name == "x.features" and np.load(path)["a"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.features"]
