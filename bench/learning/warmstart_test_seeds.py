"""How far the slow learning test (tests/test_warmstart.py::test_warm_start_then_grpo_keeps_the_held_out_reward_and_deploys)
is from failing: its exact run, over GRPO seeds, on CPU. Prints the held-out gain per seed and a normal
approximation, per assertion of the test, of the chance that one seed's gain falls below its margin.

    python bench/learning/warmstart_test_seeds.py --seeds 0 1 2 3 4 5 6 --out bench/learning/results/warmstart_test_seeds.json

Seed 0 is the test's own (conf/train.yaml). Seeds already in --out are kept: `--seeds 0` adds seed 0.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# The test's own config and margins, so the run and the claims are the test's.
from tests.test_warmstart import ACCURACY_MARGIN, FORMAT_MARGIN, LEARNING_RUN, config  # noqa: E402
from vrft.train import fit  # noqa: E402

# What the test asserts: each gain (after - before, held-out) above its margin.
CLAIMS = {"accuracy_gain": ACCURACY_MARGIN, "format_gain": FORMAT_MARGIN}


def gain(seed: int) -> dict:
    cfg = config(*LEARNING_RUN, f"seed={seed}")
    with tempfile.TemporaryDirectory() as folder:
        cfg.run_dir = folder
        fit(cfg)
        results = json.loads((Path(folder) / "held_out.json").read_text())
    before, after = results["before"], results["after"]
    return {
        "seed": seed,
        "total_gain": after["reward/total"] - before["reward/total"],
        "accuracy_gain": after["reward/accuracy"] - before["reward/accuracy"],
        "format_gain": after["reward/format"] - before["reward/format"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[], help="seeds to run (none: summarise --out)"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # Seeds already in --out are kept, so a run can add seeds to an earlier one.
    kept = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    rows = [r for r in kept if r["seed"] not in args.seeds] + [gain(seed) for seed in args.seeds]
    rows.sort(key=lambda r: r["seed"])
    summary: dict = {"rows": rows, "claims": {}}
    for r in rows:
        print(f"seed {r['seed']}: " + ", ".join(f"{key} {r[key]:+.3f}" for key in ("total_gain", *CLAIMS)))
    for key, margin in CLAIMS.items():
        gains = [r[key] for r in rows]
        mean, spread = statistics.fmean(gains), statistics.stdev(gains)
        z = (mean - margin) / spread
        p_below = 0.5 * math.erfc(z / math.sqrt(2))
        summary["claims"][key] = {"margin": margin, "mean": mean, "stdev": spread, "z": z, "p_below": p_below}
        print(
            f"{key}: mean {mean:+.3f} ± {spread:.3f} over {len(gains)} seeds; margin {margin:+.2f}: z = {z:.2f}, P(below) ~ {p_below:.1e}"
        )
    args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
