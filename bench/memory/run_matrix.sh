#!/usr/bin/env bash
# The whole benchmark matrix in one device call (see bench/README.md). On the GPU machine, from the repo root:
#   bash bench/memory/run_matrix.sh [--only NAME,NAME] [--deadline SECONDS]
# It installs the carried wheels (.whl, staged by ../shared/device/stage-wheels.sh), then runs every row
# into $OUT/rows.jsonl and $OUT/matrix.log.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 bench/memory/run_matrix.py --out "${OUT:-bench-out}" "$@"
