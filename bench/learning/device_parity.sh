#!/usr/bin/env bash
# The precision comparison in one device call (bench/learning/README.md): 2 tasks x 5 precisions x 3 seeds,
# all cells at once on one GPU; the small files of every run come back as $OUT/parity.tgz.
#   bash bench/learning/device_parity.sh [--only TEXT]
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
export VRFT_CACHE=/tmp/vrft-cache
OUT=${OUT:-bench-out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 bench/learning/run_matrix.py --matrix parity --out /tmp/parity-runs --jobs 30 --deadline "${DEADLINE:-560}" "$@"
python3 bench/learning/collect.py /tmp/parity-runs /tmp/parity && tar czf "$OUT/parity.tgz" -C /tmp parity
