#!/usr/bin/env bash
# One device call: the Gluon kernel (vrft/kernels/nf4_mma.py) profiled next to nf4_matmul's and swept.
#   bash bench/rollout/device_mma.sh            (from the repository root on the GPU machine, $OUT set)
#   NCU_KERNELS="" BUDGET=240 bash bench/rollout/device_mma.sh    # no profiles: tests and sweep, ~9 min
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
# TESTS=tests TESTS_S=270 BUDGET=170: the whole GPU suite instead of the kernel's tests, and a shorter sweep
timeout "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider -m gpu -rfE ${TESTS:-tests/kernels/test_nf4_mma.py \
    tests/kernels/test_nf4_matmul.py::test_one_launch_over_several_weights_equals_their_own_launches_under_graph_replay} \
    > "$OUT/gpu_tests.log" 2>&1
tail -15 "$OUT/gpu_tests.log"
for kernel in ${NCU_KERNELS-_matmul_4bit_kernel _mma_4bit_kernel}; do
    timeout 120 ncu --clock-control none --set full -k "regex:$kernel" --launch-skip 2 --launch-count 1 \
        -o "$OUT/ncu_$kernel" python3 bench/rollout/mma_probe.py > "$OUT/ncu_run_$kernel.log" 2>&1
    ncu --import "$OUT/ncu_$kernel.ncu-rep" --page details > "$OUT/ncu_$kernel.txt" 2>&1
    ncu --import "$OUT/ncu_$kernel.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_sass_$kernel.csv" 2>&1
    rm -f "$OUT/ncu_$kernel.ncu-rep"
    echo "== $kernel"
    grep -E "^ +(Duration|DRAM Throughput|Memory Throughput|Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Issued Warp Per Scheduler|No Eligible|Warp Cycles Per Issued Instruction|Executed Ipc Active|L2 Hit Rate|Block Limit Registers)" "$OUT/ncu_$kernel.txt"
    grep -iE "stall|cycles being stalled" "$OUT/ncu_$kernel.txt" | head -6 | cut -c1-400
done
python3 bench/rollout/mma_sweep.py --out "$OUT/mma_sweep.json" --budget-s "${BUDGET:-200}" 2>&1 | tail -40
