set -u
D=$OUT/lora_rb; mkdir -p $D
{ git rev-parse HEAD; git status --short; md5sum vrft/kernels/lora_input.py bench/memory/speed.py tests/kernels/test_lora_input.py; nvidia-smi --query-gpu=name --format=csv,noheader; } > $D/commit.txt 2>&1
OUT=$D TESTS="tests/kernels/test_lora_input.py tests/rollout/test_packed.py tests/rollout/test_engines.py tests/kernels/test_launch_order.py" TESTS_S=150 bash bench/rollout/device_mma_rows.sh tests 2>&1 | grep -v WARNING
mkdir -p /tmp/plug && echo 'import vrft.kernels.lora_input as m; m.RANK_BLOCK = 16' > /tmp/plug/rb16.py
PYTHONPATH=/tmp/plug:$PWD:/tmp/site timeout 150 python3 -m pytest -q -p no:cacheprovider -p rb16 -m gpu tests/rollout/test_packed.py tests/rollout/test_engines.py tests/kernels/test_launch_order.py -rfE > $D/gpu_tests_rb16.log 2>&1; tail -2 $D/gpu_tests_rb16.log
OUT=$D ROWS=16g ROWS_S=290 ROW_TIMEOUT=270 ENGINES=packed,packed:lora_rb16,packed:lora_rb32,packed:lora_rb16:pps8,packed:pps8 PROFILED=packed:lora_rb16 bash bench/rollout/device_mma_rows.sh rows 2>&1 | grep -v WARNING
cd $D && md5sum * > md5.txt
