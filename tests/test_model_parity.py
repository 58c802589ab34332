"""Parity of the Flax gLM with a PyTorch gLM of the original architecture and state-dict layout."""
import numpy as np
import pytest
import torch

import jax.numpy as jnp

from glm_jax.model import checkpoint
from glm_jax.interop import convert
from glm_jax.model import objective
from glm_jax.interop import torch_reference as tr
from glm_jax.model.glm import GLMConfig, contacts_from_attentions
from helpers import PARITY_ATOL as TOL, TINY_MODEL as TINY, padded_batch


def converted_pair(config: GLMConfig, seed=0):
    reference = tr.build_reference(config, seed=seed)
    params, _ = convert.torch_to_params(tr.state_dict_numpy(reference), config)
    return reference, checkpoint.model_from_params(config, params)


def test_reference_really_has_relative_positions():
    reference = tr.build_reference(TINY)
    attention = reference.roberta.roberta.encoder.layer[0].attention.self
    assert attention.position_embedding_type == "relative_key_query"
    assert tuple(attention.distance_embedding.weight.shape) == (2 * 40 - 1, 8)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("position_type", ["relative_key_query", "relative_key"])
def test_forward_parity_with_padding_and_masking(scan_layers, position_type):
    config = TINY.replace(scan_layers=scan_layers, position_embedding_type=position_type)
    reference, model = converted_pair(config)
    inputs, attention_mask, masked, labels = padded_batch(config)
    with torch.no_grad():
        expected = reference(torch.from_numpy(inputs), torch.from_numpy(attention_mask), True, True)
        torch_loss, torch_mse, torch_ce = tr.original_loss(
            expected["predictions"], expected["logits"], torch.from_numpy(labels), torch.from_numpy(masked))
    out = model(jnp.asarray(inputs), jnp.asarray(attention_mask), output_hidden_states=True, output_attentions=True)
    assert out.hidden_states.shape == (4, config.num_layers + 1, 30, 32)
    assert out.attentions.shape == (4, config.num_layers, 4, 30, 30)
    for name in ("last_hidden_state", "hidden_states", "attentions", "predictions", "logits"):
        np.testing.assert_allclose(np.asarray(getattr(out, name)), expected[name].numpy(), atol=TOL, rtol=0,
                                   err_msg=name)
    probabilities = np.asarray(jnp.exp(out.logits) / jnp.exp(out.logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(probabilities, torch.softmax(expected["logits"], -1).numpy(), atol=TOL)
    terms = objective.multi_hypothesis_loss(out.predictions, out.logits, jnp.asarray(labels), jnp.asarray(masked))
    for ours, theirs in ((terms.loss, torch_loss), (terms.mse, torch_mse), (terms.ce, torch_ce)):
        assert abs(float(ours) - float(theirs)) <= TOL * max(1.0, abs(float(theirs)))


def test_contacts_are_symmetrised_attention_heads_last():
    reference, model = converted_pair(TINY)
    inputs, attention_mask, _, _ = padded_batch(TINY)
    with torch.no_grad():
        attentions = reference(torch.from_numpy(inputs), torch.from_numpy(attention_mask), False, True)["attentions"]
    b, l, h, s, _ = attentions.shape
    flat = attentions.reshape(b, l * h, s, s)
    expected = (flat + flat.transpose(-1, -2)).permute(0, 2, 3, 1).numpy()
    out = model(jnp.asarray(inputs), jnp.asarray(attention_mask), output_attentions=True)
    contacts = np.asarray(contacts_from_attentions(out.attentions))
    assert contacts.shape == (4, 30, 30, TINY.num_layers * TINY.num_heads)
    np.testing.assert_allclose(contacts, expected, atol=TOL)
    # feature index = layer * heads + head, as the original operon predictor reads them
    np.testing.assert_allclose(contacts[0, 2, 3, 1 * 4 + 2],
                               attentions[0, 1, 2, 2, 3].item() + attentions[0, 1, 2, 3, 2].item(), atol=1e-6)


def test_round_trip_jax_torch_jax_is_exact():
    reference, model = converted_pair(TINY, seed=3)
    exported = convert.params_to_torch(checkpoint.params_as_dict(model), TINY)
    fresh = tr.build_reference(TINY, seed=99)
    result = tr.load_numpy_state_dict(fresh, exported)
    assert not result.unexpected_keys
    assert all(convert.is_unused_key(k) for k in result.missing_keys)
    params_again, _ = convert.torch_to_params(tr.state_dict_numpy(fresh), TINY)
    original = checkpoint.params_as_dict(model)
    flat_a = dict(_flatten(original))
    flat_b = dict(_flatten(params_again))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), flat_b[key], err_msg=key)
    for name, tensor in tr.state_dict_numpy(reference).items():
        if not convert.is_unused_key(name):
            np.testing.assert_array_equal(tensor, exported[name], err_msg=name)


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_compute_stays_close_to_float32(dtype):
    """bf16/fp16 matmuls (fp32 softmax/LayerNorm/loss): stated tolerance on the last hidden state
    (unit-variance after LayerNorm, |values| up to ~4, returned in the compute dtype) 1e-2 mean abs
    and 2^-4 max abs (four bf16 ulps at 2-4: four layers of bf16 matmuls), and 2e-2 on
    probabilities, for the same weights. Measured (bf16, CPU): mean 4.8e-3, max 5.2e-2."""
    config = GLMConfig(emb_dim=65, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256,
                       max_position_embeddings=64, num_pc=20)
    _, model32 = converted_pair(config)
    model16 = checkpoint.model_from_params(config.replace(compute_dtype=dtype),
                                           checkpoint.params_as_dict(model32))
    inputs, attention_mask, _, _ = padded_batch(config)
    out32 = model32(jnp.asarray(inputs), jnp.asarray(attention_mask))
    out16 = model16(jnp.asarray(inputs), jnp.asarray(attention_mask))
    assert out16.last_hidden_state.dtype == jnp.dtype(dtype)
    assert out16.predictions.dtype == jnp.float32 and out16.logits.dtype == jnp.float32
    hidden_errors = jnp.abs(out16.last_hidden_state.astype(jnp.float32) - out32.last_hidden_state)
    prob_error = float(jnp.abs(jax_softmax(out16.logits) - jax_softmax(out32.logits)).max())
    assert 0 < float(hidden_errors.mean()) < 1e-2 and float(hidden_errors.max()) < 2 ** -4
    assert prob_error < 2e-2


def jax_softmax(x):
    return jnp.exp(x - x.max(-1, keepdims=True)) / jnp.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
