#!/usr/bin/env bash
# The GPU measurements of issues 9 (attention kernels) and 10 (throughput), in parts that each fit
# one 10-minute command, every step under its own time limit, records appended to OUT/results.jsonl
# and everything printed to OUT/session.log. Made for a lent GPU machine without network (the
# image: Python 3.12, newer jax with CUDA, torch, transformers 5, no TensorFlow or biopython).
#
#   bash benchmarks/gpu_session.sh OUT_DIR PART     PART: kernels | train | esm2 (or all)
#
# transformers 5 drops gLM's relative_key_query, so the PyTorch reference gLM needs 4.57.6: wheels
# in $GLM_JAX_WHEELS (default .whl) are installed into /tmp/site first. Prepare them where pip works:
#   for w in transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w"; done
# Afterwards: `python benchmarks/run.py report --results OUT_DIR/results.jsonl`, or append the
# records to benchmarks/results/results.jsonl and regenerate the README tables.
# GLM_JAX_GPU_SESSION_DRY=1 prints the steps without running them; GLM_JAX_GPU_SESSION_QUICK=1 runs
# the benchmarks at toy size (--quick), to check the script on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: benchmarks/gpu_session.sh OUT_DIR kernels|train|esm2|all}"
PART="${2:?usage: benchmarks/gpu_session.sh OUT_DIR kernels|train|esm2|all}"
case "$PART" in
  kernels|train|esm2|all) ;;
  *) echo "benchmarks/gpu_session.sh: unknown part '$PART': kernels, train, esm2 or all" >&2; exit 2 ;;
esac
DRY="${GLM_JAX_GPU_SESSION_DRY:-0}"
QUICK=()
[ "${GLM_JAX_GPU_SESSION_QUICK:-0}" = "1" ] && QUICK=(--quick)
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1 USE_TF=0 TF_CPP_MIN_LOG_LEVEL=3

WHEELS="${GLM_JAX_WHEELS:-.whl}"
if [ "$DRY" != "1" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# step LIMIT_SECONDS COMMAND...: runs it (or prints it), logs its output and exit status, goes on
step() {
  local limit=$1; shift
  if [ "$DRY" = "1" ]; then echo "$*"; return; fi
  echo "== $(date -u +%T) $* (limit ${limit} s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}
bench() { local limit=$1; shift; step "$limit" python3 benchmarks/run.py "$@" --output "$OUT/results.jsonl" "${QUICK[@]}"; }

kernels() {
  # the Pallas kernel compiled (not interpreted) against the reference, then every attention at long S
  step 240 python3 -m pytest -q -p no:cacheprovider tests/test_pallas_attention.py
  bench 300 attention --lengths 512,2048,8192 --dtypes bfloat16 --repeats 3
}
train() {
  # gLM-base step: float32 and JAX bf16 vs PyTorch fp16 autocast (as the original trained), MFU
  bench 360 train_step --configs base --batch 8,32,64 --baselines eager --repeats 5
  bench 120 forward --configs base --batch 64 --baselines eager --repeats 5
  bench 60 input_pipeline --windows 2000 --batch 64 --repeats 3
}
esm2() {
  # ESM2-650M (random weights) at ~300 residues, bf16 vs fp16 autocast EsmModel: both attentions at
  # the original's 12,290-token batches, then cuDNN's at 4x larger batches (batch sizing on a GPU)
  local proteins=(--size 650M --fasta benchmarks/data/proteins_250-350.faa --proteins 825 --dtypes bfloat16)
  bench 300 esm2 "${proteins[@]}" --attention dot_product,query_blocks --repeats 3
  bench 240 esm2 "${proteins[@]}" --attention dot_product --max-tokens 49160 --repeats 3
}

step 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ "$PART" = "all" ]; then kernels; train; esm2; else "$PART"; fi
