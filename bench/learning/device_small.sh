#!/usr/bin/env bash
# The small model's precision comparison in one device call (bench/learning/README.md): its cells at once on
# one GPU. The first cell of each task makes that task's SFT warm start (the others wait on its cache lock);
# the small files of every run come back as $OUT/small.tgz.
#   [BUDGET=530] [JOBS=60] bash bench/learning/device_small.sh [--only TEXT[,TEXT...]] [overrides...]
# BUDGET: seconds this whole script may take, set below the device call's limit. Cells still running near it
# are stopped (each keeps what it wrote: metrics, and held_out.json after each held-out measurement) and
# collected. $OUT/small.tgz is also rewritten after each cell that finishes, so a call cut off from outside
# still returns the cells finished by then. DEADLINE (seconds for the cells alone) overrides BUDGET.
set -uo pipefail
BUDGET=${BUDGET:-530}
RESERVE=15  # seconds kept after the cells for collecting and packing
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
export VRFT_CACHE=/tmp/vrft-cache
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The preset checkpoint once, before the cells ask for it.
python3 -c "from vrft.models.presets import preset_checkpoint; preset_checkpoint('small')"
# The runs' small files as $OUT/small.tgz, replaced atomically (run_matrix runs it one at a time).
pack="python3 bench/learning/collect.py /tmp/small-runs /tmp/small && tar czf '$OUT/small.tgz.partial' -C /tmp small \
&& mv '$OUT/small.tgz.partial' '$OUT/small.tgz'"
deadline=${DEADLINE:-$((BUDGET - SECONDS - RESERVE))}
echo "cells get ${deadline} s (${SECONDS} s spent on setup)"
python3 bench/learning/run_matrix.py --matrix small-parity --out /tmp/small-runs --jobs "${JOBS:-60}" \
    --deadline "$deadline" --after-each "$pack" "$@"
bash -c "$pack"
echo "done after ${SECONDS} s"
