#!/usr/bin/env bash
# The prepared GPU measurement: bench/scale_gpu.py (FLUX.1-dev fp8 1024 px egrpo_fast / egrpo on the diffusers
# and comfy paths, Qwen-Image 1024 px with block swap, Wan 2.2 5B 480p x 33 frames, DDP / FSDP2 on 2+ GPUs),
# one printed table, results as scale_gpu_<device>.{json,md} in $OUT (the device machine's output folder) or
# bench/results. BUDGET (seconds, default 510) is the whole run's: the steps stop cleanly before it.
# The comfy path runs when COMFYUI_PATH is a ComfyUI checkout importable by this python.
# On a machine whose python has torch, transformers and accelerate but no diffusers, the wheels in .whl/
# (diffusers 0.42.1, peft 0.21.2, importlib_metadata 8.7.0, git-ignored) are installed into /tmp/site first.
# Make them once where pip reaches PyPI, in the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform any -d .whl diffusers==0.42.1 peft==0.21.2 importlib_metadata==8.7.0
# Extra arguments go to bench/scale_gpu.py; `bash bench/scale_gpu.sh --tiny --device cpu` is the CPU dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import diffusers, peft" 2>/dev/null; then
  ls .whl/*.whl >/dev/null || { echo "no diffusers here and no wheels in .whl/: see the header of $0" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" bench/scale_gpu.py --budget-seconds "${BUDGET:-510}" --out "${OUT:-bench/results}" "$@"
