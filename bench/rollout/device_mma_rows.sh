#!/usr/bin/env bash
# nf4_mma's kernel as the default (bench/rollout/results.md, "A kernel without shared memory"): the whole
# GPU suite, then packed.py's rows (their training steps through the new kernel), the decode step of
# `packed` with each kernel side by side. Carry .whl; results in $OUT. VRFT_NF4_MMA as set by the caller
# (unset: on).
#   bash bench/rollout/device_mma_rows.sh tests    # ~4 min
#   TESTS_S=380 DIST_S=190 bash bench/rollout/device_mma_rows.sh suite   # all of it, test_distributed apart
#   bash bench/rollout/device_mma_rows.sh rows     # ~3-6 min
#   bash bench/rollout/device_mma_rows.sh overlap  # launch_overlap.py, ~1 min
#   bash bench/rollout/device_mma_rows.sh attention  # attention_sweep.py (BASELINE: the old kernel's file)
#   TESTS_S=320 ROWS_S=250 bash bench/rollout/device_mma_rows.sh tests rows   # both in one call
#   TESTS="tests/kernels tests/rollout" bash bench/rollout/device_mma_rows.sh tests   # some of the suite
# ROW_ARGS: more run_row.py arguments ("--phase-stats", "--trace-rollout"); CLOCKS=1 logs nvidia-smi's clocks
# to $OUT/clocks.csv while the rows run.
# ENGINES and PROFILED override the engines timed and profiled (bench/memory/speed.py's names and suffixes):
#   ENGINES=bf16_copy,bf16_copy:serial,packed,packed:serial PROFILED=packed ROWS=16g ...   # launch overlap
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
# BASE_TREE: a folder holding another commit's vrft/ (`git archive <commit> vrft | tar -x -C <folder>`),
# imported before this tree's: the rows of that code, in the same call, as a baseline
export PYTHONPATH="${BASE_TREE:+$PWD/$BASE_TREE:}$PWD:/tmp/site" PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
for part in "${@:-usage}"; do
    case "$part" in
    tests)
        timeout "${TESTS_S:-300}" python3 -m pytest -q -p no:cacheprovider -m gpu ${TESTS:-tests} -rfE \
            > "$OUT/gpu_tests.log" 2>&1
        tail -3 "$OUT/gpu_tests.log"
        ;;
    suite)  # the whole GPU suite in two runs: test_distributed's FSDP int4 test alone takes minutes
        timeout "${TESTS_S:-380}" python3 -m pytest -q -p no:cacheprovider -m gpu tests -rfE --durations=15 \
            --ignore=tests/test_distributed.py > "$OUT/gpu_tests.log" 2>&1
        tail -3 "$OUT/gpu_tests.log"
        timeout "${DIST_S:-200}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_distributed.py -rfE \
            --durations=0 > "$OUT/gpu_tests_distributed.log" 2>&1
        tail -3 "$OUT/gpu_tests_distributed.log"
        ;;
    rows)
        if [ -n "${CLOCKS:-}" ]; then  # the GPU's clocks, power and throttle reasons every 200 ms
            nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
                --format=csv,nounits -lms 200 > "$OUT/clocks.csv" 2>&1 &
            clocks=$!
        fi
        timeout "${ROWS_S:-560}" python3 bench/rollout/packed.py --out "$OUT" --rows "${ROWS:-16g,24g,16g_G16}" \
            --engines "${ENGINES:-bf16_copy,packed:nf4_matmul,packed:mma}" \
            --profiled "${PROFILED:-packed:nf4_matmul,packed:mma}" --timeout "${ROW_TIMEOUT:-170}" \
            ${ROW_ARGS:+--row-args="$ROW_ARGS"} | grep -v "^{" | tail -45
        if [ -n "${CLOCKS:-}" ]; then kill "$clocks"; fi
        ;;
    attention)
        timeout "${ATTENTION_S:-150}" python3 bench/rollout/attention_sweep.py --out "$OUT/attention_sweep.json" \
            ${BASELINE:+--baseline "$BASELINE"} ${ATTENTION_ARGS:-}
        ;;
    overlap)
        timeout "${OVERLAP_S:-120}" python3 bench/rollout/launch_overlap.py --out "$OUT/launch_overlap.json"
        ;;
    *)
        echo "usage: $0 tests|suite|rows|attention|overlap [...]" >&2
        exit 2
        ;;
    esac
done
echo "done after ${SECONDS} s"
