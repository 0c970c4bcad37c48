#!/usr/bin/env bash
# One device call for the shared x A^T of the packed engine (bench/rollout/results.md, "Shared x A^T"):
#   bash bench/rollout/device_shared_lora.sh        # carry .whl; results in $OUT
# 1. the GPU tests of the kernels and the rollout engines (they gate the change);
# 2. the 7B decode step of `packed` and `bf16_copy` (packed.py, row 16g: the row that times the engines).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/rollout -rfE > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"
echo "tests done after ${SECONDS} s"
timeout 200 python3 bench/rollout/packed.py --out "$OUT" --rows 16g --engines bf16_copy,packed --timeout 190 \
    | grep -v "^{" | tail -40
echo "done after ${SECONDS} s"
