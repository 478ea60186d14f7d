#!/usr/bin/env bash
# Isolation runs for the GPU check (each configuration in its own process, so one CUDA fault cannot
# poison the next): FLUX.1-dev fp8 with gradient checkpointing off, bf16 storage with it on, and fp8
# with it on under CUDA_LAUNCH_BLOCKING=1 (to name the faulting kernel). Same wheels as scale_gpu.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/results/probe}; mkdir -p "$OUT"
run() {  # name, seconds, extra args...
  local name=$1 budget=$2; shift 2
  echo "=== $name: $*" | tee -a "$OUT/log.txt"
  timeout $((budget + 30)) python3 bench/scale.py --models flux-dev --iterations 1 --budget-seconds "$budget" \
    --out "/tmp/$name" "$@" >> "$OUT/log.txt" 2>&1; echo "exit $?" | tee -a "$OUT/log.txt"
  cp /tmp/$name/*.json "$OUT/$name.json" 2>/dev/null || true
}
run fp8_nockpt 110 --checkpointing off --presets egrpo_fast --resolutions 1024
run bf16_ckpt 100 --checkpointing on --weight-dtype bfloat16 --presets egrpo_fast --resolutions 1024
CUDA_LAUNCH_BLOCKING=1 run fp8_ckpt_blocking 90 --checkpointing on --presets egrpo_fast --resolutions 512
run fp8_nockpt_egrpo512 80 --checkpointing off --presets egrpo --resolutions 512
