#!/usr/bin/env bash
# Two device calls, first made for the LoRA term on the tensor cores (bench/rollout/results.md, "LoRA term
# on the tensor cores"), since then for each kernel change; back to back on one warm machine; carry .whl;
# results in $OUT:
#   bash bench/rollout/device_lora_dot.sh tests   # the whole GPU suite, then the kernel at 16 rows with a
#                                                 # rank-64 LoRA term (kernel_sweep.py --lora-rank 64)
#   bash bench/rollout/device_lora_dot.sh rows    # packed.py rows 16g (decode step of bf16_copy and packed,
#                                                 # or of $ENGINES) and 24g (the 16 GB profile's baseline)
#   bash bench/rollout/device_lora_dot.sh all     # tests, then rows
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
case "${1:-}" in
tests)
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests -rfE > "$OUT/gpu_tests.log" 2>&1
    tail -3 "$OUT/gpu_tests.log"
    echo "tests done after ${SECONDS} s"
    timeout 200 python3 bench/rollout/kernel_sweep.py --out "$OUT/kernel_lora64.json" --rows 16 --lora-rank 64 \
        | tail -12
    ;;
all)  # both, in one call: the suite, the kernel at 16 rows, then the rows (~8 min on a warm machine)
    bash "$0" tests && bash "$0" rows
    ;;
rows)
    timeout 560 python3 bench/rollout/packed.py --out "$OUT" --rows "${ROWS:-16g,24g}" --engines "${ENGINES:-bf16_copy,packed}" \
        --timeout 270 | grep -v "^{" | tail -40
    ;;
*)
    echo "usage: $0 tests|rows|all" >&2
    exit 2
    ;;
esac
echo "done after ${SECONDS} s"
