"""The errors glm-jax raises on bad input, one small hierarchy.

Every `GlmJaxError` carries a one-line message naming the file, record, tensor or field at fault;
`glm-jax` (glm_jax/cli/main.py) prints it as `glm-jax COMMAND: error: MESSAGE` and exits with
status 2, without a traceback. The concrete errors subclass ValueError too, so library callers
that catch ValueError keep working.

    GlmJaxError
      InputError          bad user data (genome, FASTA, npz batch, shards, embedding store)
      ConfigError         config file or --config.x=y override
      CheckpointError     model directory, training workdir or state dict that cannot be used
      DistributedError    several processes that cannot form one run (no cluster, coordinator unreachable)
"""
from __future__ import annotations

import difflib
from typing import Iterable


class GlmJaxError(Exception):
    """An error the command line reports as one line (no traceback)."""


class InputError(GlmJaxError, ValueError):
    """Bad user data; the message names the file and the record or field."""


class ConfigError(GlmJaxError, ValueError):
    """A config file or command-line override that cannot be applied."""


class CheckpointError(GlmJaxError, ValueError):
    """A checkpoint or state dict that does not exist in the expected form or does not fit."""


class DistributedError(GlmJaxError, RuntimeError):
    """Processes that cannot form one run: no cluster environment, an unreachable coordinator,
    a process count that the batch or the shards do not divide."""


def did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    """' (did you mean 'PREFIXx'?)' for the candidate closest to `name`, or '' when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (third-party messages can run to pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
