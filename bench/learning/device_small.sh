#!/usr/bin/env bash
# The small model's precision comparison in one device call (bench/learning/README.md): 3 tasks x 5
# precisions x 3 seeds, all cells at once on one GPU. The first cell of each task makes that task's SFT warm
# start (the others wait on its cache lock); the small files of every run come back as $OUT/small.tgz.
#   bash bench/learning/device_small.sh [--only TEXT] [overrides...]
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
export VRFT_CACHE=/tmp/vrft-cache
OUT=${OUT:-bench-out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The preset checkpoint once, before 45 processes ask for it.
python3 -c "from vrft.models.presets import preset_checkpoint; preset_checkpoint('small')"
python3 bench/learning/run_matrix.py --matrix small-parity --out /tmp/small-runs --jobs "${JOBS:-45}" \
    --deadline "${DEADLINE:-480}" "$@"
python3 bench/learning/collect.py /tmp/small-runs /tmp/small && tar czf "$OUT/small.tgz" -C /tmp small
