"""The one state-dict reader (glm_jax/interop/state_dict.py), used by gLM conversion and ESM2 loading."""
import numpy as np
import pytest
import torch

from glm_jax.interop import state_dict as sd
from glm_jax.proteins import esm2


def test_round_trip_both_formats_and_the_training_checkpoint_wrapper(tmp_path):
    tensors = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.bias": np.ones(3, np.float32)}
    for name in ("w.safetensors", "w.bin"):
        sd.write_state_dict(tmp_path / name, tensors)
        read = sd.read_state_dict(tmp_path / name)
        assert sorted(read) == sorted(tensors) and all(np.array_equal(read[k], tensors[k]) for k in tensors)
    torch.save({"epoch": 1, "model_state_dict": {k: torch.from_numpy(v) for k, v in tensors.items()}}, tmp_path / "cp.pt")
    assert sorted(sd.read_state_dict(tmp_path / "cp.pt")) == sorted(tensors)
    half = {"h": torch.ones(2, dtype=torch.float16)}
    torch.save(half, tmp_path / "half.bin")
    assert sd.read_state_dict(tmp_path / "half.bin")["h"].dtype == np.float32


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("not a checkpoint"), r"cannot read .*bad\.bin as a weights-only PyTorch state dict"),
    (lambda p: torch.save([1, 2, 3], p), r"bad\.bin holds a list, not a state dict"),
    (lambda p: torch.save({"step": 3}, p), r"bad\.bin: a dict without tensors"),
])
def test_files_that_are_not_state_dicts_are_named(tmp_path, make, message):
    make(tmp_path / "bad.bin")
    with pytest.raises(sd.StateDictError, match=message):
        sd.read_state_dict(tmp_path / "bad.bin")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(sd.StateDictError, match=r"cannot read .*bad\.safetensors as safetensors"):
        sd.read_state_dict(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        sd.read_state_dict(tmp_path / "missing.bin")


def test_esm2_and_glm_config_inference_name_the_missing_tensor():
    from glm_jax.interop import convert
    with pytest.raises(sd.StateDictError, match=r"no tensor 'embeddings\.word_embeddings\.weight': not an HF ESM checkpoint"):
        esm2.infer_config({"x": np.zeros(1)})
    with pytest.raises(sd.StateDictError, match="not an original gLM checkpoint"):
        convert.infer_config({"x": np.zeros(1)})
