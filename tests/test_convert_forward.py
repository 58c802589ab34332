"""`convert-torch`, `export-torch` and `forward`: the scriptable contract, end to end through the CLI."""
import json
import pathlib
import re

import numpy as np
import pytest
import torch

from glm_jax.model import checkpoint
from glm_jax.cli import main as cli
from glm_jax.interop import convert
from glm_jax.interop import torch_reference as tr
from glm_jax.model.glm import GLM, GLMConfig, count_parameters, create_model
from flax import nnx

from helpers import PARITY_ATOL as TOL, TINY_MODEL as TINY, padded_batch, save_original_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A random reference gLM saved like the released glm.bin (full state dict, duplicates included)."""
    directory = tmp_path_factory.mktemp("original")
    reference = save_original_checkpoint(TINY, directory, seed=7)
    return reference, directory


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    _, directory = original
    destination = tmp_path_factory.mktemp("converted") / "model"
    assert cli.main(["convert-torch", str(directory / "glm.bin"), str(destination)]) == 0
    return destination


def test_converted_checkpoint_carries_its_config(converted):
    assert checkpoint.read_model_config(converted) == TINY


def test_hf_config_json_gives_the_same_config(original, tmp_path):
    _, directory = original
    destination = tmp_path / "model"
    assert cli.main(["convert-torch", str(directory / "glm.bin"), str(destination),
                     "--hf-config", str(directory / "config.json")]) == 0
    assert checkpoint.read_model_config(destination) == TINY


def test_config_file_with_overrides_must_match_the_tensors(original, tmp_path, capsys):
    _, directory = original
    assert cli.main(["convert-torch", str(directory / "glm.bin"), str(tmp_path / "m"),
                     "--config", str(REPO / "configs" / "tiny.py"), "--config.model.num_layers=4"]) == 2
    assert re.search(r"missing tensors: \['roberta\.roberta\.encoder\.layer\.3\.", capsys.readouterr().err)


def test_forward_cli_matches_torch_with_masking_and_labels(original, converted, tmp_path):
    reference, _ = original
    inputs, attention_mask, masked, labels = padded_batch(TINY, seed=5)
    unmasked_inputs = np.where(masked[..., None], 0.5, inputs).astype(np.float32)  # forward must set -1 itself
    np.savez(tmp_path / "batch.npz", inputs_embeds=unmasked_inputs, attention_mask=attention_mask,
             labels=labels, masked_tokens=masked[..., None])
    assert cli.main(["forward", "--checkpoint", str(converted), "--input", str(tmp_path / "batch.npz"),
                     "--output", str(tmp_path / "out.npz"), "--batch-size", "3"]) == 0
    out = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        expected = reference(torch.from_numpy(inputs), torch.from_numpy(attention_mask), True, True)
        loss, _, _ = tr.original_loss(expected["predictions"], expected["logits"], torch.from_numpy(labels),
                                      torch.from_numpy(masked))
    for name in ("last_hidden_state", "hidden_states", "attentions", "predictions"):
        np.testing.assert_allclose(out[name], expected[name].numpy(), atol=TOL, err_msg=name)
    np.testing.assert_allclose(out["probabilities"], torch.softmax(expected["logits"], -1).numpy(), atol=TOL)
    assert out["contacts"].shape == (4, 30, 30, 12)
    assert abs(float(out["loss"]) - loss.item()) < TOL
    assert int(out["masked_count"]) == masked.sum()
    assert 0.0 <= float(out["pseudo_accuracy"]) <= 1.0


def test_export_then_original_layout_loads_and_agrees(original, converted, tmp_path):
    reference, _ = original
    for suffix in (".bin", ".safetensors"):
        destination = tmp_path / f"exported{suffix}"
        assert cli.main(["export-torch", str(converted), str(destination)]) == 0
        state_dict = convert.read_state_dict(destination)
        fresh = tr.build_reference(TINY, seed=11)
        tr.load_numpy_state_dict(fresh, state_dict)
        inputs, attention_mask, _, _ = padded_batch(TINY)
        with torch.no_grad():
            a = fresh(torch.from_numpy(inputs), torch.from_numpy(attention_mask))["predictions"]
            b = reference(torch.from_numpy(inputs), torch.from_numpy(attention_mask))["predictions"]
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    exported_config = json.loads(destination.with_suffix(".config.json").read_text())
    assert GLMConfig.from_hf_dict(exported_config) == TINY


def test_bad_state_dicts_get_errors_naming_the_tensors(original):
    reference, _ = original
    state_dict = tr.state_dict_numpy(reference)
    missing = {k: v for k, v in state_dict.items() if k != "roberta.lm_head.dense_prob.bias"}
    with pytest.raises(ValueError, match="missing tensors.*dense_prob.bias"):
        convert.torch_to_params(missing, TINY)
    unexpected = dict(state_dict, **{"roberta.surprise.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="unexpected tensors.*roberta.surprise.weight"):
        convert.torch_to_params(unexpected, TINY)
    wrong = dict(state_dict)
    wrong["roberta.roberta.encoder.layer.1.intermediate.dense.weight"] = np.zeros((65, 32), np.float32)
    # The one wrongly shaped tensor is named, with both shapes (not "layers differ in shape").
    with pytest.raises(ValueError, match=r"wrong shapes: roberta\.roberta\.encoder\.layer\.1\.intermediate\.dense\.weight "
                                         r"has shape \(65, 32\), expected \(64, 32\)$"):
        convert.torch_to_params(wrong, TINY)
    params, _ = convert.torch_to_params(state_dict, TINY)
    with pytest.raises(ValueError, match="mlp_in_kernel: expected shape"):
        checkpoint.model_from_params(TINY.replace(intermediate_size=48), params)


def test_data_parallel_prefix_and_training_checkpoint_are_accepted(original, tmp_path):
    reference, _ = original
    wrapped = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"epoch": 3, "model_state_dict": wrapped}, tmp_path / "train.cp")
    params, dropped = convert.torch_to_params(convert.read_state_dict(tmp_path / "train.cp"), TINY)
    assert params["encoder"]["query_kernel"].shape == (3, 32, 4, 8)
    assert any(name.startswith("roberta.encoder.") for name in dropped)


def test_code_carrying_pickles_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))
    torch.save({"dense.weight": Payload()}, tmp_path / "evil.bin")
    with pytest.raises(ValueError, match="weights-only"):
        convert.read_state_dict(tmp_path / "evil.bin")


def test_forward_rejects_bad_inputs(converted, tmp_path, capsys):
    model = checkpoint.load_model(converted)
    from glm_jax.inference.predict import forward
    good = {"inputs_embeds": np.zeros((2, 30, 33), np.float32), "attention_mask": np.ones((2, 30))}
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, genes, 33\]"):
        forward(model, dict(good, inputs_embeds=np.zeros((2, 30, 34))))
    nan = good["inputs_embeds"].copy()
    nan[1, 4, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*\[\[1, 4\]\]"):
        forward(model, dict(good, inputs_embeds=nan))
    with pytest.raises(ValueError, match="batch: missing attention_mask"):
        forward(model, {"inputs_embeds": good["inputs_embeds"]})
    with pytest.raises(ValueError, match=r"labels must be \[2, 30, 12\]"):
        forward(model, dict(good, labels=np.zeros((2, 30, 11))))
    assert cli.main(["forward", "--checkpoint", str(converted), "--input", str(tmp_path / "nope.npz"),
                     "--output", str(tmp_path / "o.npz")]) == 2
    assert "glm-jax forward: error: input not found" in capsys.readouterr().err
    np.savez(tmp_path / "batch.npz", **good)
    assert cli.main(["forward", "--checkpoint", str(tmp_path / "absent"), "--input", str(tmp_path / "batch.npz"),
                     "--output", str(tmp_path / "o.npz")]) == 2
    assert "glm-jax forward: error: checkpoint not found" in capsys.readouterr().err


def test_glm_base_parameter_counts_match_the_original_and_readme():
    """Parameters the original's forward pass uses vs the glm-jax model; and the full state dict."""
    with torch.device("meta"):
        reference = tr.ReferenceGLM(tr.roberta_config(GLMConfig()))
    state_dict = reference.state_dict()
    total = sum(t.numel() for t in state_dict.values())
    used = sum(t.numel() for name, t in state_dict.items() if not convert.is_unused_key(name))
    ours = count_parameters(nnx.eval_shape(lambda: create_model(GLMConfig())))
    assert used == ours == 278_867_988
    assert total == 1_030_550_227
    readme = (REPO / "README.md").read_text()
    assert "278,867,988" in readme and "1,030,550,227" in readme


def test_infer_config_from_shapes_defaults_to_relative_key_query(original):
    reference, _ = original
    inferred = convert.infer_config(tr.state_dict_numpy(reference))
    assert inferred == TINY
    assert isinstance(create_model(inferred), GLM)


def test_forward_runs_on_the_original_reference_batch_file(shared_data, tmp_path):
    """The original's batch (real E. coli genes, 1281-d inputs, 100-d labels) through the CLI."""
    config = GLMConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    model_dir = checkpoint.save_model(tmp_path / "model", create_model(config, seed=1))
    assert cli.main(["forward", "--checkpoint", str(model_dir), "--input", str(shared_data / "reference/batch.npz"),
                     "--output", str(tmp_path / "out.npz")]) == 0
    out = np.load(tmp_path / "out.npz")
    reference = np.load(shared_data / "reference/batch.npz")
    assert out["last_hidden_state"].shape == (2, 30, 64)
    assert out["predictions"].shape == (2, 30, 4, 100)
    assert int(out["masked_count"]) == 0  # nothing masked: the original's glm_embed.py setting
    direct = checkpoint.load_model(model_dir)(
        np.asarray(reference["embeds"], np.float32), np.asarray(reference["attention_mask"], np.float32))
    np.testing.assert_allclose(out["last_hidden_state"], np.asarray(direct.last_hidden_state), atol=1e-5)
