"""Shared test fixtures. Real-data fixtures come from ../shared/data (never copied into the repo)."""
import os
import pathlib

import pytest

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _shared_data_dir() -> pathlib.Path:
    env = os.environ.get("GLM_JAX_SHARED_DATA")
    candidates = [pathlib.Path(env)] if env else []
    candidates += [REPO_ROOT.parent / "shared" / "data", REPO_ROOT / ".." / ".." / "shared" / "data"]
    for candidate in candidates:
        if (candidate / "reference" / "batch.npz").is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        "shared data not found: set GLM_JAX_SHARED_DATA to the folder holding reference/ and genomes/")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Folder with the real-data fixtures (reference/, ecoli/, genomes/)."""
    return _shared_data_dir()
