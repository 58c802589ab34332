#!/usr/bin/env bash
# Train on a TPU pod slice: the same command on every worker VM (gcloud ssh --worker=all);
# `--distributed` lets jax.distributed.initialize() discover the slice from the TPU metadata.
# Usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x.y=value ...]
#   WORKDIR and the shards must be on GCS (gs://...) or another filesystem all workers see.
# v5p-64 (32 chips = 32 JAX devices) with configs/glm_3b.py (data -1, fsdp 8) -> mesh (4, 8, 1).
# Assumes glm-jax is installed on every worker (e.g. the same command with "pip install -e .").
set -euo pipefail
TPU="$1"; ZONE="$2"; CONFIG="$3"; WORKDIR="$4"; shift 4
EXTRA="$(printf ' %q' "$@")"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/glm-jax && USE_TF=0 TF_CPP_MIN_LOG_LEVEL=3 glm-jax train --distributed --config $CONFIG --workdir $WORKDIR$EXTRA"
