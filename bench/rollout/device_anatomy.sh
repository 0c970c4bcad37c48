#!/usr/bin/env bash
# One device call: where nf4_mma's time goes (bench/rollout/mma_anatomy.py) and Nsight Compute's stall
# reasons for the kernel itself (the 7B gate projection at 16 rows, bench/rollout/mma_probe.py), per SASS
# instruction. Carry .whl; results in $OUT (~4 min).
#   bash bench/rollout/device_anatomy.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv
timeout "${ANATOMY_S:-240}" python3 bench/rollout/mma_anatomy.py --out "$OUT/mma_anatomy.json" ${ANATOMY_ARGS:-}
if [ -z "${NO_NCU:-}" ]; then
    timeout 150 ncu --clock-control none --set full --import-source no -k "regex:_mma_4bit_kernel" \
        --launch-skip 2 --launch-count 1 -o "$OUT/ncu_mma" python3 bench/rollout/mma_probe.py \
        > "$OUT/ncu_run.log" 2>&1
    ncu --import "$OUT/ncu_mma.ncu-rep" --page details > "$OUT/ncu_mma.txt" 2>&1
    ncu --import "$OUT/ncu_mma.ncu-rep" --page raw --csv > "$OUT/ncu_mma_raw.csv" 2>&1
    ncu --import "$OUT/ncu_mma.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_mma_sass.csv" 2>&1
    rm -f "$OUT/ncu_mma.ncu-rep"
    grep -E "^ +(Duration|DRAM Throughput|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Achieved Occupancy)" \
        "$OUT/ncu_mma.txt"
fi
echo "done after ${SECONDS} s"
