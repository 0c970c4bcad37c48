#!/usr/bin/env bash
# One device call: the GPU-marked tests, and the GRPO tuning matrix of the default run (bench/learning/README.md).
#   bash bench/learning/device_tuning.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false VRFT_CACHE=/tmp/vrft-cache
OUT=${OUT:-bench-out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ "${GPU_TESTS:-1}" = 1 ] && (python3 -m pytest -q -m gpu -p no:cacheprovider tests > "$OUT/gpu_tests.log" 2>&1; echo "exit $?" >> "$OUT/gpu_tests.log") &
python3 bench/learning/run_matrix.py --matrix "${MATRIX:-tuning-lr-beta}" --out /tmp/learning --jobs 18 --deadline 400
wait
python3 bench/learning/collect.py /tmp/learning /tmp/tuning && tar czf "$OUT/tuning.tgz" -C /tmp tuning
tail -5 "$OUT/gpu_tests.log"
