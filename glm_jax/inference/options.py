"""What an `infer` run's outputs depend on besides its inputs, model and features."""
from __future__ import annotations

import dataclasses

from glm_jax.errors import InputError

ATTENTION_MODES = (None, "pairs", "maps")


class InferenceInputError(InputError):
    """Inputs that cannot be run (no genes, mismatched model/features); names the file or field."""


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """Every field is pinned in the run's manifest (a rerun with other options is refused)."""
    window: int = 30
    stride: int | None = None
    layers: tuple[int, ...] = ()
    hypotheses: bool = False
    context_only: bool = False
    attention: str | None = None
    include_esm2: bool = False
    attention_impl: str = "reference"
    chunk_windows: int = 256

    @property
    def step(self) -> int:
        return self.stride if self.stride is not None else max(1, self.window // 2)

    def check(self, num_layers: int, max_positions: int, clip_distances: bool = False) -> None:
        from glm_jax import kernels
        if not 1 <= self.step <= self.window:
            raise InferenceInputError(f"need 1 <= stride <= window, got window {self.window}, stride {self.stride}")
        if self.window > max_positions and not clip_distances:
            raise InferenceInputError(f"window {self.window} exceeds the checkpoint's max_position_embeddings "
                                      f"{max_positions} (--clip-distances lifts the limit)")
        if self.attention not in ATTENTION_MODES:
            raise InferenceInputError(f"attention must be one of pairs, maps or None, got {self.attention!r}")
        if self.attention is not None and not kernels.returns_probs(self.attention_impl):
            raise InferenceInputError(f"--attention {self.attention} needs attention maps, which attention "
                                      f"implementation {self.attention_impl!r} does not keep; use reference or "
                                      "xla_shifted")
        bad = [layer for layer in self.layers if not 0 <= layer <= num_layers]
        if bad:
            raise InferenceInputError(f"layers {bad} outside 0..{num_layers} (0: the embedding output, "
                                      f"{num_layers}: the last layer)")
        if self.chunk_windows < 1:
            raise InferenceInputError(f"chunk_windows must be >= 1, got {self.chunk_windows}")
