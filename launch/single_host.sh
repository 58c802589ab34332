#!/usr/bin/env bash
# Train on one machine: every local device (CPU, or all GPUs of the host) in one mesh.
# Usage: launch/single_host.sh CONFIG WORKDIR [--config.x.y=value ...]
#   e.g. launch/single_host.sh configs/glm_base.py runs/base --config.data.train_pattern=shards/
# 8xH100: configs/glm_base.py -> mesh (data 8, fsdp 1, tensor 1); configs/glm_1b.py -> (1, 8, 1).
set -euo pipefail
CONFIG="$1"; WORKDIR="$2"; shift 2
export USE_TF=0 TF_CPP_MIN_LOG_LEVEL=3
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
exec glm-jax train --config "$CONFIG" --workdir "$WORKDIR" "$@"
