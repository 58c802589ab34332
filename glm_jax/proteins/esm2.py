"""ESM2 protein language model in pure-functional JAX, computing what HF `EsmModel` / fair-esm compute.

    x = word_embedding[tokens] * 0.88 / (1 - observed <mask> fraction)     # token-dropout rescaling
    per layer (pre-LN):
        x = x + Dense(attention(rotary(q / sqrt(d)), rotary(k), v))(LayerNorm(x))
        x = x + Dense(gelu_erf(Dense(LayerNorm(x))))
    x = emb_layer_norm_after(x)

Parameters are a plain pytree (nested dicts of arrays) with the layer tensors stacked on a
leading `layers` axis, run under `lax.scan`. Layer numbering follows fair-esm's
`representations`: 0 is the embedding output, `i` the output of layer `i`, and the last layer
`num_layers` is taken *after* `emb_layer_norm_after` (= HF `last_hidden_state`; HF
`hidden_states[-1]` is the same layer before that LayerNorm). gLM uses layer 33 of the 650M
model, i.e. the post-LayerNorm final representation.

Numerics: weights are float32; `compute_dtype="bfloat16"` runs the matmuls in bf16 while the
residual stream, LayerNorm and softmax stay float32.

Padding: padded positions are zeroed after the embedding and the <mask> fraction is taken over
real tokens, as in fair-esm, so a sequence's output does not depend on how much it is padded.
HF 4.57's `EsmModel.forward` does not pass the attention mask to its embeddings, so for a padded
row that contains <mask> tokens HF divides by the padded length instead; without <mask> tokens
(every embedding run) the two agree at every real position.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import kernels
from glm_jax.errors import ConfigError, InputError
from glm_jax.interop.state_dict import StateDictError, read_state_dict, tensor_shape
from glm_jax.perf_defaults import platform_default

Params = dict[str, Any]

# The 33-token ESM alphabet (fair-esm `Alphabet.from_architecture("ESM-1b")`, HF vocab.txt order).
ALPHABET = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-",
    "<null_1>", "<mask>",
)
CLS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 32
MASK_RATIO_TRAIN = 0.15 * 0.8  # fraction of <mask>-zeroed tokens in every ESM training run
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Single-character tokens -> id; every other byte is <unk>.
_BYTE_TO_ID = np.full(256, UNK_ID, dtype=np.int32)
for _id, _tok in enumerate(ALPHABET):
    if len(_tok) == 1:
        _BYTE_TO_ID[ord(_tok)] = _id


@dataclasses.dataclass(frozen=True)
class Esm2Config:
    """Architecture of an ESM2 model (the fields of an HF `EsmConfig` that ESM2 uses)."""

    num_layers: int = 6  # transformer layers ("t6" .. "t48")
    hidden_size: int = 320  # embedding width
    num_heads: int = 20  # attention heads; head_dim = hidden_size / num_heads
    intermediate_size: int = 1280  # MLP width (4 x hidden in every ESM2)
    vocab_size: int = 33  # the ESM alphabet
    layer_norm_eps: float = 1e-5
    token_dropout: bool = True  # rescale embeddings by 0.88 / (1 - <mask> fraction), as in training

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"hidden_size {self.hidden_size} must split into {self.num_heads} heads of even size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def named(cls, name: str) -> "Esm2Config":
        """One of the released ESM2 sizes: "8M", "35M", "150M", "650M", "3B", "15B" (or the
        fair-esm name such as "esm2_t33_650M_UR50D")."""
        key = re.sub(r"^esm2_t\d+_|_UR50D$", "", name)
        if key not in ESM2_SIZES:
            raise ConfigError(f"unknown ESM2 size {name!r}; known: {', '.join(ESM2_SIZES)}")
        return ESM2_SIZES[key]

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "Esm2Config":
        """From an HF `EsmConfig` (or its config.json as a dict); refuses non-ESM2 variants."""
        hf = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        hf["emb_layer_norm_before"] = bool(hf.get("emb_layer_norm_before"))  # EsmConfig's default is None
        wrong = {key: hf.get(key) for key, want in _HF_ESM2_FIXED.items() if hf.get(key, want) != want}
        if wrong:
            raise Esm2CheckpointError(f"not an ESM2 config (expected {_HF_ESM2_FIXED}), got {wrong}")
        return cls(num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                   num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                   vocab_size=hf.get("vocab_size", 33), layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
                   token_dropout=hf.get("token_dropout", True))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


# HF EsmConfig fields that must hold for the architecture implemented here.
_HF_ESM2_FIXED = {"position_embedding_type": "rotary", "emb_layer_norm_before": False, "hidden_act": "gelu",
                  "pad_token_id": PAD_ID, "mask_token_id": MASK_ID, "is_decoder": False}

ESM2_SIZES = {  # fair-esm esm2_t{layers}_{size}_UR50D
    "8M": Esm2Config(num_layers=6, hidden_size=320, num_heads=20, intermediate_size=1280),
    "35M": Esm2Config(num_layers=12, hidden_size=480, num_heads=20, intermediate_size=1920),
    "150M": Esm2Config(num_layers=30, hidden_size=640, num_heads=20, intermediate_size=2560),
    "650M": Esm2Config(num_layers=33, hidden_size=1280, num_heads=20, intermediate_size=5120),
    "3B": Esm2Config(num_layers=36, hidden_size=2560, num_heads=40, intermediate_size=10240),
    "15B": Esm2Config(num_layers=48, hidden_size=5120, num_heads=40, intermediate_size=20480),
}


# ----------------------------------------------------------------------------------------------
# Tokenizer


def tokenize(sequence: str) -> np.ndarray:
    """Protein sequence -> [len + 2] int32 ids: <cls> residues <eos>.

    One token per character (the alphabet is upper case; anything outside it is <unk>). This
    equals `EsmTokenizer` / fair-esm for sequences over the alphabet; they differ only in that
    they merge a *run* of unknown characters into a single <unk>.
    """
    residues = _BYTE_TO_ID[np.frombuffer(sequence.encode("utf-8"), dtype=np.uint8)]
    return np.concatenate([[CLS_ID], residues, [EOS_ID]]).astype(np.int32)


def pad_batch(token_rows: list[np.ndarray], length: int | None = None, rows: int | None = None) -> np.ndarray:
    """Right-pad token rows with <pad> -> [rows, length] int32 (extra rows are all padding)."""
    length = length or max(len(r) for r in token_rows)
    out = np.full((rows or len(token_rows), length), PAD_ID, dtype=np.int32)
    for i, row in enumerate(token_rows):
        out[i, : len(row)] = row
    return out


def check_vocab(vocab_file: pathlib.Path) -> None:
    """A model's vocab.txt must be the ESM alphabet (our tokenizer is built in)."""
    vocab = tuple(vocab_file.read_text().split())
    if vocab != ALPHABET:
        raise Esm2CheckpointError(f"{vocab_file}: vocabulary differs from the 33-token ESM alphabet: {vocab}")


# ----------------------------------------------------------------------------------------------
# Model


def _layer_norm(x, p, eps):
    """LayerNorm in float32 over the last axis. x [..., hidden] -> float32 [..., hidden]"""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p, dtype):
    """x [..., in] @ kernel [in, out] + bias in `dtype`; the products accumulate in float32, the
    only bf16 matmul XLA:CPU runs natively (a bf16 -> bf16 dot is upcast to float32 operands)."""
    product = jnp.matmul(x.astype(dtype), p["kernel"].astype(dtype), preferred_element_type=jnp.float32)
    return (product + p["bias"].astype(jnp.float32)).astype(dtype)


def _gelu(x):
    """Exact (erf) GELU written as ESM / HF do. `jax.nn.gelu(approximate=False)` goes through
    erfc, which XLA:CPU expands into two polynomials, an exp and two divisions per element: the
    erf form is 1.3x faster on ESM2-8M's [tokens, 1280] MLP activations (equal to ~1e-6)."""
    return x * 0.5 * (1.0 + jax.lax.erf(x * 2 ** -0.5))


def default_inv_freq(head_dim: int) -> np.ndarray:
    """Rotary frequencies 10000^(-2i/head_dim) -> float32 [head_dim / 2]"""
    return (1.0 / (10000 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)


def _rotary_tables(inv_freq, tokens: int):
    """cos and sin of the rotary angles, computed once per call rather than per element of q and k.
    inv_freq [..., head_dim / 2] -> (cos, sin) float32 [..., tokens, head_dim]"""
    angles = jnp.arange(tokens, dtype=jnp.float32)[:, None] * inv_freq[..., None, :]
    angles = jnp.concatenate([angles, angles], -1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotary(x, cos, sin):
    """Rotary position embedding (half-split layout). x [batch, heads, tokens, head_dim], cos and
    sin [tokens, head_dim] (`_rotary_tables`)"""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def _blocked_attention(q, k, v, key_valid, query_block: int):
    """Softmax attention over blocks of queries: each step of a scan takes `query_block` queries
    against all keys, so scores are [batch, heads, query_block, tokens] at a time instead of
    [.., tokens, tokens] (a 12k-residue protein fits). Head-major operands make each block one
    batched matmul, softmax, matmul that XLA:CPU fuses into a single YNNPACK call; on CPU this is
    ~1.7x faster than an online softmax over key blocks (ESM2-8M at 32 x 384 and 8 x 1536 tokens).
    Scores and softmax statistics are float32.

    q, k, v [batch, heads, tokens, head_dim]; key_valid [batch, tokens] bool -> float32 like q
    """
    batch, heads, tokens, head_dim = q.shape
    blocks = -(-tokens // query_block)
    size = -(-tokens // blocks)  # equal blocks, so at most blocks - 1 padded queries
    pad = blocks * size - tokens
    q_blocks = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(batch, heads, blocks, size, head_dim)
    # not -inf: an all-padding row must not give NaN
    key_bias = jnp.where(key_valid, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]

    def step(_, q_block):  # [batch, heads, size, head_dim]
        scores = jnp.einsum("bhqd,bhkd->bhqk", q_block, k, preferred_element_type=jnp.float32) + key_bias
        weights = jnp.exp(scores - scores.max(-1, keepdims=True))
        out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return None, out / weights.sum(-1, keepdims=True)

    _, out = jax.lax.scan(step, None, jnp.moveaxis(q_blocks, 2, 0))  # [blocks, batch, heads, size, head_dim]
    return jnp.moveaxis(out, 0, 2).reshape(batch, heads, blocks * size, head_dim)[:, :, :tokens]


def _rotate_qk(q, k, cos, sin):
    """ESM scales the query before the rotation (not the scores after it); the results differ."""
    return _rotary(q * q.shape[-1] ** -0.5, cos, sin), _rotary(k, cos, sin)


def _attend_query_blocks(qkv, rotary, key_valid, query_block: int):
    """`_blocked_attention` in head-major layout. qkv [batch, tokens, 3, heads, head_dim], rotary
    (cos, sin) [tokens, head_dim] -> [batch, tokens, heads, head_dim]"""
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # [3, batch, heads, tokens, head_dim]
    q, k = _rotate_qk(q, k, *rotary)
    return _blocked_attention(q, k, v, key_valid, query_block).swapaxes(1, 2)


def _attend_dot_product(qkv, rotary, key_valid, query_block: int):
    """`jax.nn.dot_product_attention` in its [batch, tokens, heads, head_dim] layout, with the key
    padding as per-row lengths (padding follows a row's tokens, as `pad_batch` makes it): cuDNN's
    fused flash attention on NVIDIA GPUs for 16-bit compute, XLA's attention elsewhere (all scores
    of a row at once). Where cuDNN refuses the shapes (head size, version), the layer runs
    `_attend_query_blocks` instead, with a warning. Same arguments and result as that function."""
    q, k, v = jnp.moveaxis(qkv, 2, 0)  # [3, batch, tokens, heads, head_dim]
    q, k = _rotate_qk(q, k, *(table[:, None] for table in rotary))
    # at least 1: an all-padding row attends to its first token instead of an empty softmax (NaN)
    call = dict(scale=1.0, key_value_seq_lengths=jnp.maximum(key_valid.sum(-1), 1).astype(jnp.int32))
    if kernels.dot_product_implementation(q.dtype) == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **call)
        except (NotImplementedError, ValueError, RuntimeError) as refusal:
            logging.getLogger(__name__).warning("cuDNN attention refused %s x %s heads of %s: %s; using query blocks",
                                                q.shape[:2], q.shape[2], q.shape[3], refusal)
            return _attend_query_blocks(qkv, rotary, key_valid, query_block)
    return jax.nn.dot_product_attention(q, k, v, implementation="xla", **call)


# How a layer attends (`attention=` of `hidden_states` / `mean_embeddings`); each takes and returns
# the same arrays, so they compute the same function up to float summation order.
ATTENTION = {"query_blocks": _attend_query_blocks, "dot_product": _attend_dot_product}


def default_attention(compute_dtype: str) -> str:
    """The platform's `esm2_attention` (glm_jax.perf_defaults) for 16-bit compute; query blocks in
    float32, which cuDNN's fused kernel does not take (XLA's dot_product_attention would hold every
    score of a batch at once: 12 GB for one 12k-token protein)."""
    return platform_default("esm2_attention") if compute_dtype != "float32" else "query_blocks"


def check_attention(attention: str) -> str:
    if attention not in ATTENTION:
        raise ConfigError(f"ESM2 attention must be one of {sorted(ATTENTION)}, got {attention!r}")
    return attention


def _layer(x, p, key_valid, config: Esm2Config, dtype, query_block: int, attention: str):
    """One pre-LN transformer layer. x float32 [batch, tokens, hidden] -> same."""
    batch, tokens, _ = x.shape
    h = _layer_norm(x, p["attention_norm"], config.layer_norm_eps)
    # q, k and v in one matmul (3x wider: faster on CPU than three)
    qkv = {leaf: jnp.concatenate([p[name][leaf] for name in ("query", "key", "value")], -1)
           for leaf in ("kernel", "bias")}
    qkv = _dense(h, qkv, dtype).reshape(batch, tokens, 3, config.num_heads, config.head_dim)
    attended = ATTENTION[attention](qkv, p["rotary"], key_valid, query_block).reshape(batch, tokens, -1)
    x = x + _dense(attended, p["attention_out"], dtype).astype(jnp.float32)
    h = _layer_norm(x, p["mlp_norm"], config.layer_norm_eps)
    h = _gelu(_dense(h, p["mlp_in"], dtype))
    return x + _dense(h, p["mlp_out"], dtype).astype(jnp.float32)


def _embed(params: Params, tokens, config: Esm2Config):
    """Token embeddings with token-dropout rescaling. tokens [batch, tokens] -> float32 [batch, tokens, hidden]"""
    x = params["embedding"][tokens].astype(jnp.float32)
    real = tokens != PAD_ID
    if config.token_dropout:
        is_mask = tokens == MASK_ID
        x = jnp.where(is_mask[..., None], 0.0, x)
        observed = is_mask.sum(-1) / jnp.maximum(real.sum(-1), 1)
        x = x * ((1 - MASK_RATIO_TRAIN) / (1 - observed))[:, None, None]
    return x * real[..., None]


def _run_layers(params: Params, tokens, config: Esm2Config, num_layers: int, compute_dtype: str,
                query_block: int, attention: str, collect: bool):
    """Embedding + the first `num_layers` layers (+ final LayerNorm when all layers run).

    -> (x [batch, tokens, hidden], per-layer outputs [num_layers, batch, tokens, hidden] or None)
    """
    dtype = COMPUTE_DTYPES[compute_dtype]
    key_valid = tokens != PAD_ID
    layers = jax.tree.map(lambda a: a[:num_layers], params["layers"])
    layers["rotary"] = _rotary_tables(layers["inv_freq"], tokens.shape[1])

    def step(x, p):
        x = _layer(x, p, key_valid, config, dtype, query_block, attention)
        return x, (x if collect else None)

    x, per_layer = jax.lax.scan(step, _embed(params, tokens, config), layers)
    if num_layers == config.num_layers:
        x = _layer_norm(x, params["final_norm"], config.layer_norm_eps)
    return x, per_layer


@functools.partial(jax.jit, static_argnames=("config", "compute_dtype", "query_block", "attention"))
def hidden_states(params: Params, tokens, config: Esm2Config, compute_dtype: str = "float32",
                  query_block: int | None = None, attention: str | None = None):
    """All representations, fair-esm numbering. tokens [batch, tokens] int
    -> float32 [num_layers + 1, batch, tokens, hidden]: 0 = embeddings, i = after layer i, the
    last one after `emb_layer_norm_after`. query_block: queries per attention block (None: the
    platform's `esm2_query_block`); attention: a name in `ATTENTION` (None: `default_attention`)."""
    query_block = query_block or platform_default("esm2_query_block")
    attention = check_attention(attention or default_attention(compute_dtype))
    embedded = _embed(params, tokens, config)
    final, per_layer = _run_layers(params, tokens, config, config.num_layers, compute_dtype, query_block, attention,
                                   True)
    return jnp.concatenate([embedded[None], per_layer[:-1], final[None]])


@functools.partial(jax.jit, static_argnames=("config", "layer", "compute_dtype", "query_block", "attention"))
def mean_embeddings(params: Params, tokens, config: Esm2Config, layer: int | None = None,
                    compute_dtype: str = "float32", query_block: int | None = None, attention: str | None = None):
    """Per-protein embedding: the mean of representation `layer` (default: the last, after
    `emb_layer_norm_after`, as gLM's pipeline) over residue positions only (no <cls>/<eos>/<pad>).
    Runs only the layers it needs. tokens [batch, tokens] int -> float32 [batch, hidden]
    (all-padding rows give zeros)."""
    layer = config.num_layers if layer is None else layer
    query_block = query_block or platform_default("esm2_query_block")
    attention = check_attention(attention or default_attention(compute_dtype))
    if not 0 <= layer <= config.num_layers:
        raise InputError(f"layer {layer} outside 0..{config.num_layers}")
    x, _ = _run_layers(params, tokens, config, layer, compute_dtype, query_block, attention, False)
    residue = ((tokens != PAD_ID) & (tokens != CLS_ID) & (tokens != EOS_ID)).astype(jnp.float32)
    return (x * residue[..., None]).sum(1) / jnp.maximum(residue.sum(1), 1.0)[:, None]


def init_params(config: Esm2Config, seed: int = 0) -> Params:
    """Random parameters (normal(0.02) weights, LayerNorm 1/0), for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    L, H, F = config.num_layers, config.hidden_size, config.intermediate_size

    def dense(n_in, n_out):
        return {"kernel": rng.normal(0, 0.02, (L, n_in, n_out)).astype(np.float32),
                "bias": np.zeros((L, n_out), np.float32)}

    def norm(*lead):
        return {"scale": np.ones((*lead, H), np.float32), "bias": np.zeros((*lead, H), np.float32)}

    params = {"embedding": rng.normal(0, 0.02, (config.vocab_size, H)).astype(np.float32),
              "layers": {"attention_norm": norm(L), "query": dense(H, H), "key": dense(H, H), "value": dense(H, H),
                         "attention_out": dense(H, H), "mlp_norm": norm(L), "mlp_in": dense(H, F),
                         "mlp_out": dense(F, H), "inv_freq": np.tile(default_inv_freq(config.head_dim), (L, 1))},
              "final_norm": norm()}
    return jax.tree.map(jnp.asarray, params)


# ----------------------------------------------------------------------------------------------
# Checkpoints (HF EsmModel / EsmForMaskedLM / EsmForSequenceClassification layouts)

# HF per-layer name -> (our stacked name, leaf); nn.Linear weights [out, in] become kernels [in, out].
_LAYER_TENSORS = {
    "attention.LayerNorm.weight": ("attention_norm", "scale"),
    "attention.LayerNorm.bias": ("attention_norm", "bias"),
    "attention.self.query.weight": ("query", "kernel"),
    "attention.self.query.bias": ("query", "bias"),
    "attention.self.key.weight": ("key", "kernel"),
    "attention.self.key.bias": ("key", "bias"),
    "attention.self.value.weight": ("value", "kernel"),
    "attention.self.value.bias": ("value", "bias"),
    "attention.output.dense.weight": ("attention_out", "kernel"),
    "attention.output.dense.bias": ("attention_out", "bias"),
    "LayerNorm.weight": ("mlp_norm", "scale"),
    "LayerNorm.bias": ("mlp_norm", "bias"),
    "intermediate.dense.weight": ("mlp_in", "kernel"),
    "intermediate.dense.bias": ("mlp_in", "bias"),
    "output.dense.weight": ("mlp_out", "kernel"),
    "output.dense.bias": ("mlp_out", "bias"),
}
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# Tensors of the HF classes that ESM2 embeddings never use: absolute-position leftovers, rotary
# buffers (recomputed), the contact head, pooler, MLM and classification heads.
_UNUSED = re.compile(r"^(embeddings\.position_(ids|embeddings\.weight)|contact_head\..*|pooler\..*|lm_head\..*"
                     r"|classifier\..*)$")
# The rotary frequencies are a buffer, not a weight, but checkpoints converted from fair-esm store
# them fp16-rounded (1.0002e-02 for 1e-02) and fair-esm and HF compute with the stored values:
# used when present (a 3e-2 difference in the last layer of ESM2-8M otherwise), else computed.
_INV_FREQ = "attention.self.rotary_embeddings.inv_freq"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class Esm2CheckpointError(StateDictError):
    """A checkpoint whose tensors do not form the ESM2 model expected."""


def _expected_shapes(config: Esm2Config) -> dict[str, tuple[int, ...]]:
    """HF (prefix-free) key -> torch shape."""
    H, F = config.hidden_size, config.intermediate_size
    shapes = {"embeddings.word_embeddings.weight": (config.vocab_size, H),
              "encoder.emb_layer_norm_after.weight": (H,), "encoder.emb_layer_norm_after.bias": (H,)}
    per_layer = {name: ((H,) if name.endswith("bias") or "LayerNorm" in name else (H, H))
                 for name in _LAYER_TENSORS}
    per_layer.update({"intermediate.dense.weight": (F, H), "intermediate.dense.bias": (F,),
                      "output.dense.weight": (H, F)})
    for i in range(config.num_layers):
        shapes.update({f"encoder.layer.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def _strip_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the `esm.` prefix of EsmFor* checkpoints (plain EsmModel keys pass unchanged)."""
    return {key.removeprefix("esm."): value for key, value in state.items()}


def params_from_state_dict(state: Mapping[str, np.ndarray], config: Esm2Config) -> Params:
    """HF state dict (numpy arrays; `esm.`-prefixed or not) -> params pytree.

    Raises Esm2CheckpointError naming every missing, unexpected and wrongly shaped tensor."""
    state = _strip_prefix(state)
    expected = _expected_shapes(config)
    optional = {f"encoder.layer.{i}.{_INV_FREQ}": (config.head_dim // 2,) for i in range(config.num_layers)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in state if k not in expected and k not in optional and not _UNUSED.match(k))
    expected = expected | optional
    wrong = [f"{k}: {tuple(state[k].shape)} != expected {expected[k]}"
             for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise Esm2CheckpointError("checkpoint does not match " + repr(config) + "".join(
            f"\n  {title} ({len(items)}): {', '.join(items[:12])}{' ...' if len(items) > 12 else ''}"
            for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if items))

    layers: dict[str, dict[str, list]] = {}
    for name, (group, leaf) in _LAYER_TENSORS.items():
        stacked = [np.asarray(state[f"encoder.layer.{i}.{name}"], np.float32) for i in range(config.num_layers)]
        layers.setdefault(group, {})[leaf] = np.stack([t.T if leaf == "kernel" else t for t in stacked])
    layers["inv_freq"] = np.stack([state.get(f"encoder.layer.{i}.{_INV_FREQ}", default_inv_freq(config.head_dim))
                                   for i in range(config.num_layers)])
    params = {"embedding": state["embeddings.word_embeddings.weight"],
              "layers": layers,
              "final_norm": {"scale": state["encoder.emb_layer_norm_after.weight"],
                             "bias": state["encoder.emb_layer_norm_after.bias"]}}
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32)), params)


def infer_config(state: Mapping[str, np.ndarray]) -> Esm2Config:
    """Config from tensor shapes alone (a weights file without config.json). The head count is
    read off the rotary buffer when present, else from the released size with that depth/width."""
    state = _strip_prefix(state)
    vocab, hidden = tensor_shape(state, "embeddings.word_embeddings.weight", "an HF ESM")
    intermediate = tensor_shape(state, "encoder.layer.0.intermediate.dense.weight", "an HF ESM")[0]
    num_layers = max(int(m.group(1)) for m in map(_LAYER_KEY.match, state) if m) + 1
    inv_freq = state.get(f"encoder.layer.0.{_INV_FREQ}")
    if inv_freq is not None:
        heads = hidden // (2 * inv_freq.shape[0])
    else:
        released = [c for c in ESM2_SIZES.values() if (c.num_layers, c.hidden_size) == (num_layers, hidden)]
        if not released:
            raise Esm2CheckpointError(f"cannot tell the head count of a {num_layers}-layer, {hidden}-wide "
                                  "checkpoint: put its config.json next to the weights")
        heads = released[0].num_heads
    return Esm2Config(num_layers=num_layers, hidden_size=hidden, num_heads=heads,
                      intermediate_size=intermediate, vocab_size=vocab)


def _weights_in(directory: pathlib.Path) -> pathlib.Path:
    for name in WEIGHT_FILES:
        for candidate in (directory / name, directory / f"{name}.index.json"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{directory}: no {' or '.join(WEIGHT_FILES)} (or a sharded *.index.json)")


def load_esm2(path: str | pathlib.Path, config: Esm2Config | None = None) -> tuple[Esm2Config, Params]:
    """ESM2 weights from an HF model directory (config.json + model.safetensors/pytorch_model.bin,
    vocab.txt checked when present) or from a single weights file (config from `config`, a
    config.json beside it, or the tensor shapes). -> (config, params)"""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no ESM2 model at {path}")
    directory, weights = (path, _weights_in(path)) if path.is_dir() else (path.parent, path)
    state = read_state_dict(weights)
    if config is None:
        config_file = directory / "config.json"
        config = Esm2Config.from_hf(json.loads(config_file.read_text())) if config_file.is_file() \
            else infer_config(state)
    if (directory / "vocab.txt").is_file():
        check_vocab(directory / "vocab.txt")
    return config, params_from_state_dict(state, config)


def fingerprint(config: Esm2Config, params: Params) -> str:
    """sha256 of the config and of tensors that any fine-tuning changes (embedding matrix, final
    LayerNorm, every bias of the last layer): identifies a model without hashing gigabytes."""
    digest = hashlib.sha256(config.to_json().encode())
    leaves = [params["embedding"], params["final_norm"]["scale"], params["final_norm"]["bias"]]
    leaves += [group["bias"][-1] for group in params["layers"].values() if isinstance(group, dict)]
    for leaf in leaves:
        digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return digest.hexdigest()
