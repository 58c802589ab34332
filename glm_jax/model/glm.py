"""gLM in Flax NNX: input projection -> RoBERTa encoder (relative_key_query) -> multi-hypothesis head.

Computes the same function as the original PyTorch gLM (an HF `RobertaModel` called with
`inputs_embeds`, `position_embedding_type="relative_key_query"`), see docs/ARCHITECTURE.md#encoder:

    x = LayerNorm(Dense(genes) + token_type_embedding[0])            # no absolute positions
    per layer (post-LN, BERT):
        scores[h, i, j] = (q_i.k_j + q_i.D[i-j] + k_j.D[i-j]) / sqrt(head_dim) + padding_bias[j]
        x = LayerNorm(x + Dense(softmax(scores) @ v))
        x = LayerNorm(x + Dense(gelu(Dense(x))))
    predictions = Dense(x) -> [..., num_pred, num_pc];  logits = Dense(x) -> [..., num_pred]

Layer parameters are stacked along a leading "layers" axis, so the same parameters run under
`lax.scan` (fast compilation at depth) or a Python loop (`scan_layers=False`; bf16 compute on
CPU always, see `scans_layers`); checkpoints do not depend on that choice. Every parameter
carries `logical_axes` metadata for `sharding.py`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax import kernels, sharding
from glm_jax.errors import ConfigError, InputError
from glm_jax.model.attention import attention
from glm_jax.model.dropout import dropout
from glm_jax.perf_defaults import platform_default

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
POSITION_EMBEDDING_TYPES = ("relative_key_query", "relative_key", "none")


@dataclasses.dataclass(frozen=True)
class GLMConfig:
    """Architecture and numerics of a gLM. Defaults are the original `train.py` model."""

    emb_dim: int = 1281                  # ESM2-650M mean embedding (1280) + orientation (+-0.5)
    hidden_size: int = 1280
    num_layers: int = 19
    num_heads: int = 10
    intermediate_size: int = 3072        # RobertaConfig default: the original never sets it
    max_position_embeddings: int = 512   # default (the original misspells the key): 1023 distance rows
    position_embedding_type: str = "relative_key_query"  # | "relative_key" | "none"
    type_vocab_size: int = 1
    num_pc: int = 100                    # label size: 99 whitened PCs + orientation
    num_pred: int = 4                    # hypotheses per masked gene
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    max_genes: int = 30                  # genes per contig window
    compute_dtype: str = "float32"       # "bfloat16": matmuls in bf16; LayerNorm, softmax, loss stay fp32
    param_dtype: str = "float32"         # master weights
    scan_layers: bool = True             # lax.scan over the layer stack (fast compiles at depth)
    remat_policy: str = "none"           # "none" | "full" | "dots" | "dots_no_batch"
    attention: str = "reference"         # a name of glm_jax.kernels.IMPLEMENTATIONS (docs/attention.md)
    clip_distances: bool = False         # |i - j| > max_position_embeddings - 1 -> the table's end rows

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ConfigError(f"position_embedding_type must be one of {POSITION_EMBEDDING_TYPES}, "
                              f"got {self.position_embedding_type!r}")
        if self.num_pred < 2:
            raise ConfigError("num_pred must be >= 2 (the multi-hypothesis head with probabilities)")
        if self.max_genes > self.max_position_embeddings and not self.clip_distances:
            raise ConfigError(f"max_genes {self.max_genes} exceeds max_position_embeddings "
                              f"{self.max_position_embeddings}: distances would fall off the table "
                              "(clip_distances=True maps them to its end rows)")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {tuple(DTYPES)}, got {getattr(self, name)!r}")
        kernels.check_name(self.attention)
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy must be one of {tuple(REMAT_POLICIES)}, got {self.remat_policy!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_distances(self) -> int:
        """Rows of each layer's distance table: distances -(P-1)..(P-1)."""
        return 2 * self.max_position_embeddings - 1

    @classmethod
    def from_dict(cls, values: dict) -> "GLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown GLMConfig fields: {unknown}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "GLMConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: dict, **overrides) -> "GLMConfig":
        """From the original's RobertaConfig JSON (with its extra emb_dim/num_pc/num_pred fields)."""
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ConfigError(f"only hidden_act='gelu' is supported, got {hf['hidden_act']!r}")
        if not hf.get("predict_probs", True):
            raise ConfigError("predict_probs=False (single-hypothesis gLM) is not supported")
        values = dict(
            emb_dim=hf.get("emb_dim", 1281),
            hidden_size=hf.get("hidden_size", 768),
            num_layers=hf.get("num_hidden_layers", 12),
            num_heads=hf.get("num_attention_heads", 12),
            intermediate_size=hf.get("intermediate_size", 3072),
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            position_embedding_type=hf.get("position_embedding_type", "absolute"),
            type_vocab_size=hf.get("type_vocab_size", 2),
            num_pc=hf.get("num_pc", 100),
            num_pred=hf.get("num_pred", 4),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            initializer_range=hf.get("initializer_range", 0.02),
        )
        if values["position_embedding_type"] == "absolute":
            raise ConfigError("absolute position embeddings are not part of gLM; "
                              "the original uses position_embedding_type='relative_key_query'")
        values["max_genes"] = min(30, values["max_position_embeddings"])
        values.update(overrides)
        return cls(**values)

    def to_hf_dict(self) -> dict:
        """The original's RobertaConfig fields (what its `train.py` builds), as JSON-able dict."""
        return {
            "architectures": ["gLM"], "model_type": "roberta",
            "emb_dim": self.emb_dim, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "position_embedding_type": self.position_embedding_type,
            "type_vocab_size": self.type_vocab_size, "num_pc": self.num_pc, "num_pred": self.num_pred,
            "predict_probs": True, "layer_norm_eps": self.layer_norm_eps, "hidden_act": "gelu",
            "hidden_dropout_prob": self.hidden_dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "initializer_range": self.initializer_range, "tie_word_embeddings": False,
        }


def config_from_dict_like(model_config: Any) -> GLMConfig:
    """`GLMConfig` from a ConfigDict / mapping such as `config.model` of a config file."""
    if isinstance(model_config, GLMConfig):
        return model_config
    values = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    return GLMConfig.from_dict(values)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class GLMOutput(NamedTuple):
    """Model outputs; optional fields are None unless requested.

    last_hidden_state: [batch, genes, hidden]
    predictions:       [batch, genes, num_pred, num_pc]
    logits:            [batch, genes, num_pred]   (softmax gives the hypothesis probabilities)
    hidden_states:     [batch, layers + 1, genes, hidden]  (embedding output first)
    attentions:        [batch, layers, heads, genes, genes] (softmax probabilities, float32)
    """

    last_hidden_state: jax.Array
    predictions: jax.Array
    logits: jax.Array
    hidden_states: Optional[jax.Array] = None
    attentions: Optional[jax.Array] = None


def _param(rngs: nnx.Rngs, kind: str, shape, axes, config: GLMConfig) -> nnx.Param:
    """A parameter initialised like HF RoBERTa: normal(0.02) weights, zero biases, unit scales."""
    dtype = DTYPES[config.param_dtype]
    if kind == "normal":
        value = config.initializer_range * jax.random.normal(rngs.params(), shape, dtype)
    elif kind == "zeros":
        value = jnp.zeros(shape, dtype)
    elif kind == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(kind)
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    return nnx.Param(value, logical_axes=tuple(axes))


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_einsum(spec: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """einsum(spec, x, kernel) of bf16 operands, accumulated in float32; the backward does the same.

    Written out because autodiff would give the backward dots a float32 cotangent and so float32
    operands: XLA:CPU runs bf16 x bf16 -> f32 dots natively (YNNPACK, 2x the f32 rate on AVX512-BF16)
    but upcasts any other bf16 dot. The cotangent is rounded to the compute dtype first, as
    PyTorch autocast does. `spec` ("in,kernel->out") must name each index in two of its three terms.
    """
    return jnp.einsum(spec, x, kernel, preferred_element_type=jnp.float32)


def _low_precision_einsum_fwd(spec, x, kernel):
    return _low_precision_einsum(spec, x, kernel), (x, kernel)


def _low_precision_einsum_bwd(spec, residuals, cotangent):
    x, kernel = residuals
    inputs, out = spec.split("->")
    x_axes, kernel_axes = inputs.split(",")
    cotangent = cotangent.astype(x.dtype)
    dx = jnp.einsum(f"{out},{kernel_axes}->{x_axes}", cotangent, kernel, preferred_element_type=jnp.float32)
    dkernel = jnp.einsum(f"{x_axes},{out}->{kernel_axes}", x, cotangent, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def _enters_matmuls(name: str) -> bool:
    """Whether a stacked layer parameter is a matmul operand (the dense kernels and the distance
    table); norms and biases stay float32 in a lower compute dtype."""
    return name.endswith("_kernel") or name == "distance_embedding"


def _dense(x: jax.Array, kernel: jax.Array, bias: jax.Array, spec: str, dtype) -> jax.Array:
    """einsum(x, kernel) + bias in the compute dtype: [..., in] -> [..., out].

    float32: a plain einsum. Lower precision: operands in `dtype`, accumulated and biased in
    float32, returned in `dtype` (`_low_precision_einsum`)."""
    if dtype == jnp.float32:
        return jnp.einsum(spec, x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)
    y = _low_precision_einsum(spec, x.astype(dtype), kernel.astype(dtype))
    return (y + bias.astype(jnp.float32)).astype(dtype)


def encoder_layer(x, params: dict, attention_mask, rng, config: GLMConfig, return_probs: bool = False):
    """One post-LN RoBERTa layer.

    x: [batch, genes, hidden]; params: this layer's slice of `EncoderStack` arrays;
    attention_mask: [batch, genes] (1 gene, 0 padding). Returns (new x, attention probabilities
    [batch, heads, genes, genes] if `return_probs` and `config.attention` materialises them, else None).
    """
    dtype = DTYPES[config.compute_dtype]
    rngs = jax.random.split(rng, 3) if rng is not None else (None, None, None)
    x = sharding.constrain(x, ("act_batch", "act_genes", "act_embed"))
    q = _dense(x, params["query_kernel"], params["query_bias"], "bse,ehd->bshd", dtype)
    k = _dense(x, params["key_kernel"], params["key_bias"], "bse,ehd->bshd", dtype)
    v = _dense(x, params["value_kernel"], params["value_bias"], "bse,ehd->bshd", dtype)
    q = sharding.constrain(q, ("act_batch", "act_genes", "act_heads", None))
    context, probs = attention(q, k, v, params["distance_embedding"], attention_mask,
                               implementation=config.attention, max_positions=config.max_position_embeddings,
                               clip_distances=config.clip_distances, relative=config.position_embedding_type,
                               dropout_rate=config.attention_dropout, dropout_rng=rngs[0],
                               return_probs=return_probs)
    attended = _dense(context, params["out_kernel"], params["out_bias"], "bshd,hde->bse", dtype)
    attended = dropout(attended, config.hidden_dropout, rngs[1])
    x = layer_norm(attended + x.astype(dtype), params["attention_norm_scale"], params["attention_norm_bias"],
                   config.layer_norm_eps)
    hidden = _dense(x, params["mlp_in_kernel"], params["mlp_in_bias"], "bse,em->bsm", dtype)
    hidden = sharding.constrain(jax.nn.gelu(hidden, approximate=False), ("act_batch", "act_genes", "act_mlp"))
    out = _dense(hidden, params["mlp_out_kernel"], params["mlp_out_bias"], "bsm,me->bse", dtype)
    out = dropout(out, config.hidden_dropout, rngs[2])
    x = layer_norm(out + x, params["mlp_norm_scale"], params["mlp_norm_bias"], config.layer_norm_eps)
    return x, probs


class EncoderStack(nnx.Module):
    """All encoder layers' parameters, stacked on a leading [layers] axis."""

    def __init__(self, config: GLMConfig, rngs: nnx.Rngs):
        L, E, H, D, M = (config.num_layers, config.hidden_size, config.num_heads, config.head_dim,
                         config.intermediate_size)
        p = functools.partial(_param, rngs, config=config)
        for name in ("query", "key", "value"):
            setattr(self, f"{name}_kernel", p("normal", (L, E, H, D), ("layers", "embed", "heads", "head_dim")))
            setattr(self, f"{name}_bias", p("zeros", (L, H, D), ("layers", "heads", "head_dim")))
        self.distance_embedding = p("normal", (L, config.num_distances, D), ("layers", "distance", "head_dim"))
        self.out_kernel = p("normal", (L, H, D, E), ("layers", "heads", "head_dim", "embed"))
        self.out_bias = p("zeros", (L, E), ("layers", "norm"))
        self.attention_norm_scale = p("ones", (L, E), ("layers", "norm"))
        self.attention_norm_bias = p("zeros", (L, E), ("layers", "norm"))
        self.mlp_in_kernel = p("normal", (L, E, M), ("layers", "embed", "mlp"))
        self.mlp_in_bias = p("zeros", (L, M), ("layers", "mlp"))
        self.mlp_out_kernel = p("normal", (L, M, E), ("layers", "mlp", "embed"))
        self.mlp_out_bias = p("zeros", (L, E), ("layers", "norm"))
        self.mlp_norm_scale = p("ones", (L, E), ("layers", "norm"))
        self.mlp_norm_bias = p("zeros", (L, E), ("layers", "norm"))

    def arrays(self) -> dict:
        """{name: [layers, ...] array} of every stacked parameter."""
        return {name: value[...] for name, value in vars(self).items() if isinstance(value, nnx.Param)}

    def __call__(self, x, attention_mask, rng, config: GLMConfig, collect_hidden: bool, collect_attentions: bool):
        """Runs every layer. x: [batch, genes, hidden]; attention_mask: [batch, genes].

        Returns (last hidden state, per-layer outputs [layers, ...] or None, attentions or None;
        None also when the attention implementation does not materialise probabilities).
        """
        params = self.arrays()
        dtype = DTYPES[config.compute_dtype]
        if dtype != jnp.float32:
            # Matmul operands are cast once for the whole stack, not per layer: a scan then slices
            # bf16 arrays and its backward reuses them instead of saving a cast copy of every
            # layer's weights as a residual.
            params = {name: value.astype(dtype) if _enters_matmuls(name) else value for name, value in params.items()}
        layer_rngs = jax.random.split(rng, config.num_layers) if rng is not None else None

        def body(carry, layer_inputs):
            layer_params, layer_rng = layer_inputs
            new_x, probs = encoder_layer(carry, layer_params, attention_mask, layer_rng, config,
                                         return_probs=collect_attentions)
            return new_x, (new_x if collect_hidden else None, probs if collect_attentions else None)

        scan = scans_layers(config)
        policy = REMAT_POLICIES[config.remat_policy]
        if config.remat_policy != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=not scan)
        if scan:
            x, (hidden, attentions) = jax.lax.scan(body, x, (params, layer_rngs))
            return x, hidden, attentions
        per_layer = []
        # lax.split, not a[i]: its transpose concatenates the per-layer gradients, where the
        # transpose of 19 slices would pad each to the full stack and add them
        unstacked = jax.tree.map(lambda a: [part[0] for part in jax.lax.split(a, [1] * config.num_layers)], params)
        for i in range(config.num_layers):
            layer_params = {name: parts[i] for name, parts in unstacked.items()}
            x, outputs = body(x, (layer_params, None if layer_rngs is None else layer_rngs[i]))
            per_layer.append(outputs)
        hidden, attentions = (None if per_layer[0][j] is None else jnp.stack([o[j] for o in per_layer])
                              for j in range(2))
        return x, hidden, attentions


def scans_layers(config: GLMConfig) -> bool:
    """Whether the layer stack runs under `lax.scan`: `config.scan_layers`, except for bf16 compute
    on a platform whose `scan_low_precision_layers` default is False (CPU: see perf_defaults)."""
    return config.scan_layers and (config.compute_dtype == "float32"
                                   or platform_default("scan_low_precision_layers"))


class GLM(nnx.Module):
    """The gLM: gene features [batch, genes, emb_dim] -> hidden states and hypotheses."""

    def __init__(self, config: GLMConfig, rngs: nnx.Rngs):
        self.config = config
        E, P, C = config.hidden_size, config.num_pred, config.num_pc
        p = functools.partial(_param, rngs, config=config)
        self.input_kernel = p("normal", (config.emb_dim, E), ("gene_features", "embed"))
        self.input_bias = p("zeros", (E,), ("norm",))
        self.token_type_embedding = p("normal", (config.type_vocab_size, E), ("token_type", "embed"))
        self.embedding_norm_scale = p("ones", (E,), ("norm",))
        self.embedding_norm_bias = p("zeros", (E,), ("norm",))
        self.encoder = EncoderStack(config, rngs)
        self.prediction_kernel = p("normal", (E, P, C), ("embed", "hypotheses", "label"))
        self.prediction_bias = p("zeros", (P, C), ("hypotheses", "label"))
        self.logit_kernel = p("normal", (E, P), ("embed", "hypotheses"))
        self.logit_bias = p("zeros", (P,), ("hypotheses",))

    def embed(self, inputs_embeds: jax.Array, rng: Optional[jax.Array]) -> jax.Array:
        """Input projection + token type 0 + LayerNorm + dropout. [b, s, emb_dim] -> [b, s, hidden]"""
        config = self.config
        dtype = DTYPES[config.compute_dtype]
        x = _dense(inputs_embeds, self.input_kernel[...], self.input_bias[...], "bsf,fe->bse", dtype)
        x = x + self.token_type_embedding[...][0].astype(dtype)
        x = layer_norm(x, self.embedding_norm_scale[...], self.embedding_norm_bias[...], config.layer_norm_eps)
        return dropout(x, config.hidden_dropout, rng)

    def head(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        """hidden [b, s, hidden] -> predictions [b, s, num_pred, num_pc], logits [b, s, num_pred] (float32)."""
        dtype = DTYPES[self.config.compute_dtype]
        predictions = _dense(hidden, self.prediction_kernel[...], self.prediction_bias[...], "bse,epc->bspc", dtype)
        logits = _dense(hidden, self.logit_kernel[...], self.logit_bias[...], "bse,ep->bsp", dtype)
        return predictions.astype(jnp.float32), logits.astype(jnp.float32)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        attention_mask: jax.Array,
        *,
        dropout_rng: Optional[jax.Array] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> GLMOutput:
        """inputs_embeds: [batch, genes, emb_dim]; attention_mask: [batch, genes] (1 gene, 0 pad).

        Dropout is active iff `dropout_rng` is given (training); otherwise the model is deterministic.
        """
        config = self.config
        if inputs_embeds.shape[-1] != config.emb_dim:
            raise InputError(f"inputs_embeds has {inputs_embeds.shape[-1]} features per gene; "
                             f"the model expects emb_dim={config.emb_dim}")
        kernels.check_length(inputs_embeds.shape[1], config.max_position_embeddings, config.clip_distances)
        embed_rng, encoder_rng = (jax.random.split(dropout_rng) if dropout_rng is not None else (None, None))
        embedded = self.embed(inputs_embeds, embed_rng)
        x, hidden, attentions = self.encoder(embedded, attention_mask, encoder_rng, config,
                                             output_hidden_states, output_attentions)
        predictions, logits = self.head(x)
        hidden_states = None
        if output_hidden_states:
            hidden_states = jnp.concatenate([embedded[None], hidden], axis=0).swapaxes(0, 1)
        if attentions is not None:
            attentions = attentions.swapaxes(0, 1)
        return GLMOutput(last_hidden_state=x, predictions=predictions, logits=logits,
                         hidden_states=hidden_states, attentions=attentions)


def contacts_from_attentions(attentions: jax.Array) -> jax.Array:
    """The original's "contacts": all heads' attention, symmetrised, heads last.

    attentions: [batch, layers, heads, genes, genes] -> [batch, genes, genes, layers * heads]
    (feature index = layer * num_heads + head), A + A^T as in the original ContactPredictionHead.
    """
    b, l, h, s, _ = attentions.shape
    flat = attentions.reshape(b, l * h, s, s)
    return jnp.transpose(flat + flat.swapaxes(-1, -2), (0, 2, 3, 1))


def create_model(config: GLMConfig, seed: int = 0) -> GLM:
    return GLM(config, nnx.Rngs(params=seed))


def abstract_model(config: GLMConfig) -> GLM:
    """A model of `config` whose parameters are ShapeDtypeStructs: shapes, dtypes and logical axes
    without initialising (or allocating) anything."""
    return nnx.eval_shape(lambda: create_model(config))


def abstract_params(config: GLMConfig, shardings=None) -> dict:
    """Nested {name: ShapeDtypeStruct} of the parameters (the checkpoint layout), each with its
    sharding from the matching tree `shardings` when given (restore targets)."""
    shapes = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
    if shardings is None:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def count_parameters(model: GLM) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
