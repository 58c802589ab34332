"""Dropout through the model: the rate of the shipped config, inverted 1/(1-p) scaling, mean kept.

Hidden dropout is read off the embedding output (`hidden_states[:, 0]`) against the same model
without dropout. Attention dropout is read off a one-layer model whose weights make the layer
linear in the dropped attention matrix: uniform attention (zero query/key/distance weights),
constant values, an output projection that copies each head into its own units, and
LayerNorms with eps = 1e8 and scale 1e4 (then LayerNorm(y) = y - mean(y) to ~1e-8). The layer
adds, per query i and head h, S = sum over the L real keys of keep / (L (1 - p)), so
S * L * (1 - p) is the whole number of kept attention weights.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax.model import checkpoint
from glm_jax.model.dropout import drop_threshold, dropout, keep_mask
from glm_jax.model.glm import config_from_dict_like, create_model
from helpers import padding_mask, repo_config

BATCH, GENES = 64, 30
SIGMAS = 5  # binomial bounds at 5 standard deviations: a false failure has probability ~6e-7


def tiny_base_model_config(**changes):
    """configs/glm_base.py's model (its dropout rates) in a tiny shape."""
    model = repo_config("glm_base").model
    model.update(emb_dim=33, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, num_pc=12)
    model.update(changes)
    return config_from_dict_like(model)


def batch(config, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, GENES + 1, BATCH)
    mask = padding_mask(lengths, GENES)
    inputs = rng.normal(size=(BATCH, GENES, config.emb_dim)).astype(np.float32) * mask[..., None]
    return jnp.asarray(inputs), jnp.asarray(mask), lengths


@nnx.jit
def hidden_states(model, inputs, mask, rng):
    """[batch, layers + 1, genes, hidden] (dropout on iff rng is given)."""
    return model(inputs, mask, dropout_rng=rng, output_hidden_states=True).hidden_states


def assert_binomial(successes: int, trials: int, p: float, what: str):
    bound = SIGMAS * np.sqrt(p * (1 - p) / trials)
    assert abs(successes / trials - p) < bound, f"{what}: {successes}/{trials} vs p={p} (bound {bound:.2g})"


def test_shipped_rates_are_the_originals():
    config = tiny_base_model_config()
    assert (config.hidden_dropout, config.attention_dropout) == (0.1, 0.1)


def test_hidden_dropout_rate_and_inverted_scaling():
    config = tiny_base_model_config(attention_dropout=0.0)
    p = config.hidden_dropout
    model = create_model(config, seed=1)
    inputs, mask, _ = batch(config)
    kept_all = np.asarray(hidden_states(model, inputs, mask, None)[:, 0])   # [b, s, hidden]
    dropped = np.asarray(hidden_states(model, inputs, mask, jax.random.key(2))[:, 0])
    zero = dropped == 0
    assert not (kept_all == 0).any()
    assert_binomial(int(zero.sum()), zero.size, p, "zeroed fraction")
    np.testing.assert_allclose(dropped[~zero], kept_all[~zero] / (1 - p), rtol=1e-6)  # survivors scaled by 1/(1-p)
    # mean kept: E[dropped * kept_all] = E[kept_all^2]; relative noise sqrt(p / ((1-p) n)) for similar magnitudes
    ratio = float((dropped * kept_all).sum() / np.square(kept_all).sum())
    assert abs(ratio - 1) < SIGMAS * np.sqrt(p / (1 - p)) * np.sqrt(np.square(kept_all ** 2).sum()) / np.square(kept_all).sum()


def linear_attention_probe(config):
    """A one-layer model whose layer output minus its input is S(b, i, h) in unit h * head_dim."""
    params = checkpoint.params_as_dict(create_model(config, seed=3))
    enc = params["encoder"]
    H, D = config.num_heads, config.head_dim
    for name in ("query_kernel", "query_bias", "key_kernel", "key_bias", "value_kernel", "distance_embedding",
                 "out_bias", "mlp_in_kernel", "mlp_in_bias", "mlp_out_kernel", "mlp_out_bias"):
        enc[name] = np.zeros_like(enc[name])
    enc["value_bias"] = np.ones_like(enc["value_bias"])
    out = np.zeros_like(enc["out_kernel"])                               # [layers, heads, head_dim, hidden]
    for h in range(H):
        for d in range(D):
            out[0, h, d, h * D + d] = 1.0 if d % 2 == 0 else -1.0        # centred: LayerNorm leaves it alone
    enc["out_kernel"] = out
    for name in ("attention_norm_scale", "mlp_norm_scale"):
        enc[name] = np.full_like(enc[name], 1e4)
    params["embedding_norm_scale"] = np.full_like(params["embedding_norm_scale"], 1e4)
    return checkpoint.model_from_params(config, params)


def test_attention_dropout_rate_and_inverted_scaling():
    config = tiny_base_model_config(hidden_dropout=0.0, layer_norm_eps=1e8)
    p = config.attention_dropout
    model = linear_attention_probe(config)
    inputs, mask, lengths = batch(config, seed=1)
    H, D = config.num_heads, config.head_dim

    def added_per_head(rng):
        hidden = np.asarray(hidden_states(model, inputs, mask, rng), np.float64)
        return (hidden[:, 1] - hidden[:, 0])[:, :, ::D][..., :H]     # S [b, s, heads]

    np.testing.assert_allclose(added_per_head(None), 1.0, atol=1e-5)   # the probe: softmax rows sum to 1
    s = added_per_head(jax.random.key(4))
    kept = s * lengths[:, None, None] * (1 - p)                        # whole numbers iff scaled by 1/(1-p)
    np.testing.assert_allclose(kept, np.round(kept), atol=1e-3)
    trials = GENES * H * int(lengths.sum())                             # every query row, real keys only
    assert_binomial(trials - int(np.round(kept).sum()), trials, p, "dropped attention weights")
    # mean kept: each row's S has variance p / ((1 - p) L)
    rows = s.size
    assert abs(s.mean() - 1) < SIGMAS * np.sqrt(p / (1 - p) * (GENES * H / lengths).sum()) / rows


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_helper_statistics(p):
    x = jnp.arange(1, 100_001, dtype=jnp.float32)
    y = np.asarray(dropout(x, p, jax.random.key(0)))
    zero = y == 0
    assert_binomial(int(zero.sum()), zero.size, p, "zeroed fraction")
    np.testing.assert_allclose(y[~zero], np.asarray(x)[~zero] / (1 - p), rtol=1e-6)


def test_keep_mask_neighbours_are_independent_at_odd_sizes():
    """Each 32-bit draw feeds two elements: a mask that reused one half for both (or shifted the
    halves across rows) would make neighbours agree far more often than independence allows."""
    p, shape = 0.5, (999, 1001)
    keep = np.asarray(keep_mask(jax.random.key(5), p, shape))
    assert keep.shape == shape
    assert_binomial(int((~keep).sum()), keep.size, p, "dropped fraction")
    both_dropped = ~keep[:, :-1] & ~keep[:, 1:]
    assert_binomial(int(both_dropped.sum()), both_dropped.size, p * p, "neighbours both dropped")
    assert_binomial(int((~keep[:-1] & ~keep[1:]).sum()), keep[1:].size, p * p, "rows both dropped")


def test_drop_probability_is_the_rate_to_2_to_the_minus_16():
    for rate in (0.1, 0.15, 0.5, 0.9):
        assert abs(drop_threshold(rate) / 2 ** 16 - rate) <= 2 ** -17
