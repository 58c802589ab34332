"""Performance defaults that depend on the platform, in one place.

Each entry was chosen by a measurement on that platform (see README "Performance defaults");
a platform without a measurement keeps the value the code had before. Values change speed only,
never results beyond float32 summation order.
"""
from __future__ import annotations

import jax

PLATFORM_DEFAULTS = {
    # ESM2 attention runs over blocks of this many keys with an online softmax. On CPU, blocks of
    # 64 keep a [batch, heads, tokens, 64] score tile in cache: ESM2-8M attention (head_dim 16)
    # 2.0x faster than 512-key blocks at 32 x 384 tokens; whole embedding of 150 genome proteins
    # 1.17x (26.6 -> 22.8 s CPU, one thread, interleaved runs in one process).
    "esm2_key_block": {"cpu": 64, "default": 512},
    # gLM blockwise attention: queries per block (each block's scores against all keys are one
    # [batch, heads, block, genes] array) and keys per chunk of its k.D term (flops (block + chunk)
    # / block times q.k's). CPU values: see kernels/blockwise.py.
    "attention_query_block": {"cpu": 128, "default": 512},
    "attention_key_chunk": {"cpu": 32, "default": 64},
}


def platform_default(name: str, platform: str | None = None):
    """The value of `PLATFORM_DEFAULTS[name]` for `platform` (default: JAX's default backend)."""
    values = PLATFORM_DEFAULTS[name]
    return values.get(platform or jax.default_backend(), values["default"])
