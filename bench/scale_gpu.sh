#!/usr/bin/env bash
# bench/scale.py on a GPU machine whose Python has torch, transformers and accelerate but no diffusers:
# the wheels in .whl/ (diffusers 0.42.1, peft 0.21.2, importlib_metadata 8.7.0, 7 MB, git-ignored) are
# installed into /tmp/site first. Make them once where pip reaches PyPI, in the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform any -d .whl diffusers==0.42.1 peft==0.21.2 importlib_metadata==8.7.0
# Results go to $OUT (the device machine's output folder) or bench/results. BUDGET (seconds, default 420)
# must leave room under the machine's own limit: the bench stops cleanly before it, results written so far.
# Extra arguments go to bench/scale.py (e.g. --models flux-dev --iterations 1).
set -euo pipefail
cd "$(dirname "$0")/.."
ls .whl/*.whl >/dev/null || { echo "no wheels in .whl/: see the header of $0" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 bench/scale.py --budget-seconds "${BUDGET:-420}" --out "${OUT:-bench/results}" "$@"
