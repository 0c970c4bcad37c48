#!/usr/bin/env bash
# The small-model precision comparison in one device call (issue 18, bench/learning/README.md): 3 tasks x
# 5 precisions x 3 seeds = 45 cells at once on one GPU. The first cell of each task builds that task's SFT
# warm start (the three in parallel) while the other cells of the task wait on its cache lock; the "before"
# figures of held_out.json are the warm start's skill. Everything stops at DEADLINE seconds (default 500)
# so that collecting fits the call; $OUT/small.tgz is refreshed every 60 s, so a killed call still returns
# the cells finished so far.
#   DEADLINE=500 bash bench/learning/device_small.sh [--only TEXT] [overrides...]
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
export VRFT_CACHE=/tmp/vrft-cache
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
snapshot() {
    python3 bench/learning/collect.py /tmp/small-runs /tmp/small >/dev/null 2>&1 \
        && tar czf "$OUT/small.tgz.part" -C /tmp small && mv "$OUT/small.tgz.part" "$OUT/small.tgz"
}
( while sleep 60; do snapshot; done ) &
snapshots=$!
python3 bench/learning/run_matrix.py --matrix small-parity --out /tmp/small-runs --jobs 45 \
    --deadline "${DEADLINE:-500}" "$@"
kill "$snapshots"
snapshot
ls -la "$OUT"
