#!/usr/bin/env bash
# The fused 4-bit kernel timed with the L2 cold (every call reads its weights from HBM, as in the model), in
# one device call (bench/rollout/results.md, "L2"):
#   bash bench/rollout/device_cold_l2.sh        # carry .whl; results in $OUT
# 1. kernel_sweep at 16 rows the old way (--warm-l2: one weight copy, L2-resident when it fits), to compare;
# 2. kernel_sweep --sweep with the L2 cold, which recommends DEFAULTS;
# 3. those DEFAULTS applied to this copy of vrft/kernels/nf4_matmul.py (DEFAULTS.update at its end, the file
#    kept as $OUT/nf4_matmul.py), then the model's decode step (packed.py, row 16g, packed and bf16_copy) and
#    the GPU tests of the kernels and engines with them.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}
mkdir -p "$OUT/after"
python3 bench/rollout/kernel_sweep.py --out "$OUT/kernel_sweep_warm_l2.json" --rows 16 --warm-l2 | tail -8
python3 bench/rollout/kernel_sweep.py --out "$OUT/kernel_sweep_cold_l2.json" --rows 16 8 32 64 --sweep --budget-s 150 \
    | grep -v "^  layer"
python3 - "$OUT/kernel_sweep_cold_l2.json" <<'PY'
import json, sys
from pathlib import Path
recommended = json.loads(Path(sys.argv[1]).read_text())["recommended_defaults"]
from vrft.kernels.nf4_matmul import DEFAULTS
changes = {key: value for key, value in recommended.items() if DEFAULTS.get(key) != value}
print("DEFAULTS changes:", changes or "none")
if changes:
    path = Path("vrft/kernels/nf4_matmul.py")
    path.write_text(path.read_text() + f"\nDEFAULTS.update({changes!r})  # device_cold_l2.sh\n")
PY
cp vrft/kernels/nf4_matmul.py "$OUT/nf4_matmul.py"
timeout 240 python3 bench/rollout/packed.py --out "$OUT/after" --rows 16g --engines bf16_copy,packed --timeout 230 \
    | grep -v "^{" | tail -40
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/rollout -rfE > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"
echo "done after ${SECONDS} s"
