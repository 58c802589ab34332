"""Performance defaults that depend on the platform, in one place.

Each entry was chosen by a measurement on that platform (see README "Performance defaults");
a platform without a measurement keeps the value the code had before. Values change speed only,
never results beyond float32 summation order.
"""
from __future__ import annotations

import jax

PLATFORM_DEFAULTS = {
    # ESM2 attention runs over blocks of this many queries (a softmax over all keys per block). On
    # CPU, 64 queries: ESM2-8M attention 1.8x faster at 32 x 384 tokens and 1.6x at 8 x 1536 than
    # the earlier online softmax over 64-key blocks; 128 is as fast at 384 tokens but 3x slower at
    # 1536, 16-32 are 1.2-1.5x slower (interleaved, one process, 2 threads).
    "esm2_query_block": {"cpu": 64, "default": 512},
}


def platform_default(name: str, platform: str | None = None):
    """The value of `PLATFORM_DEFAULTS[name]` for `platform` (default: JAX's default backend)."""
    values = PLATFORM_DEFAULTS[name]
    return values.get(platform or jax.default_backend(), values["default"])
