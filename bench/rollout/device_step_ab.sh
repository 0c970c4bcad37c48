#!/usr/bin/env bash
# One packed.py row's training steps on this tree and on another commit's vrft/ in turns, each phase's span
# and cudaMalloc / cudaFree counts recorded (run_row.py --phase-stats) while nvidia-smi logs the GPU's clocks:
# where a step's time moved between two commits, and whether the card ran slower then (step_ab.py prints it).
# Then, optionally, the allocations live at the peak of a row's last rollout (run_row.py --trace-rollout),
# for the planner's rollout terms. Carry .whl; results in $OUT.
#   BASE_TREE=bench/rollout/baseline_<commit> ROW=16g ORDER="base new new base" bash bench/rollout/device_step_ab.sh
#   ORDER="" TRACE_ROWS="16g 24g" bash bench/rollout/device_step_ab.sh      # the traces alone
# BASE_TREE: `git archive <commit> vrft | tar -x -C <folder>`, imported before this tree's for "base" runs.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
images=/tmp/vrft-bench/images
[ -d "$images" ] || PYTHONPATH="$PWD:/tmp/site" python3 bench/memory/make_images.py "$images"
overrides() { PYTHONPATH=bench/rollout python3 -c "from packed import ROWS; print(' '.join(ROWS['$1'][0]))"; }
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv,nounits -lms 200 > "$OUT/clocks.csv" 2>&1 &
clocks=$!
run=0
for tree in ${ORDER-base new new base}; do
    run=$((run + 1))
    path="$PWD:/tmp/site"
    if [ "$tree" = base ]; then path="$PWD/${BASE_TREE:?BASE_TREE names the baseline tree}:$path"; fi
    PYTHONPATH="$path" timeout "${ROW_S:-150}" python3 bench/memory/run_row.py --name "ab_${run}_$tree" \
        --images "$images" --out "$OUT/run${run}_$tree.json" --phase-stats -- $(overrides "${ROW:-16g}") \
        > "$OUT/run${run}_$tree.log" 2>&1
    echo "run $run ($tree): exit $? after ${SECONDS} s"
done
for row in ${TRACE_ROWS:-}; do
    PYTHONPATH="$PWD:/tmp/site" timeout "${ROW_S:-150}" python3 bench/memory/run_row.py --name "trace_$row" \
        --images "$images" --out "$OUT/trace_$row.json" --trace-rollout -- $(overrides "$row") \
        > "$OUT/trace_$row.log" 2>&1
    echo "trace $row: exit $? after ${SECONDS} s"
done
kill "$clocks"
python3 bench/rollout/step_ab.py "$OUT" | tee "$OUT/step_ab.txt"
echo "done after ${SECONDS} s"
