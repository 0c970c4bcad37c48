"""Learning experiments (bench/learning): many short `python -m vrft.train` runs in parallel, one device call.

    python bench/learning/run_matrix.py --matrix parity --out $OUT [--jobs 10] [--deadline 540]

Each cell is a `python -m vrft.train` command line; it is exactly one job of the Hydra multirun that the
matrix stands for (printed by `--print-multirun`), run as its own process so that cells share the GPU.
Cells that share a warm start wait while the first of them makes it (a lock in the vrft cache). Every cell
writes its run folder (`metrics.csv`, `held_out.json`) under `<out>/runs/<cell>`; `report.py` turns the
folders into the figures.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# name -> (sweep axes as Hydra overrides, fixed overrides)
MATRICES: dict[str, tuple[dict[str, list[str]], list[str]]] = {
    # The precision comparison: one warm start per task, GRPO under each precision, three seeds.
    "parity": (
        {
            "+experiment": ["parity_classification", "parity_detection"],
            "precision": ["bf16", "int8", "mixed_tiny", "int4", "int4_qat"],
            "seed": ["1", "2", "3"],
        },
        [],
    ),
    # The same on the 105M-parameter small model, three tasks (issue 18); `mixed` keeps its first and last of
    # 8 decoder layers in bf16. Its warm starts are made by the first cell of each task (bench/learning/README.md).
    # Detection twice: with plain `generate` rollouts and with the static engine (bf16_copy), which the int8
    # cells need to finish in a device call; grounding uses the static engine (its experiment says why).
    "small-parity": (
        {
            "+experiment": [
                "small_parity_classification",
                "small_parity_detection",
                "small_parity_detection_bf16_copy",
                "small_parity_grounding",
            ],
            "precision": ["bf16", "int8", "mixed", "int4", "int4_qat"],
            "seed": ["1", "2", "3"],
        },
        [],
    ),
    # How the default run's GRPO settings were chosen (bench/learning/README.md): learning rate x KL weight ...
    "tuning-lr-beta": (
        {"optimizer.lr": ["3e-4", "1e-3", "3e-3"], "loss.beta": ["0.04", "0.0"]},
        ["algorithm.max_new_tokens=24"],
    ),
    # ... learning rate x warmup over seeds (the default run's robustness) ...
    "tuning-schedule": (
        {
            "optimizer.lr,scheduler.num_warmup_steps": ["3e-4,0", "5e-4,0", "5e-4,10", "1e-3,0", "1e-3,10"],
            "seed": ["0", "1", "2"],
        },
        [],
    ),
    # ... and warm start length x learning rate with a fixed <think> sentence instead of one naming the answer.
    "tuning-fixed-reasoning": (
        {
            "warm_start.steps": ["60", "110", "160"],
            "optimizer.lr": ["3e-4", "6e-4", "1e-3"],
            "seed": ["1", "2"],
        },
        ["algorithm.max_new_tokens=24", "task.reasoning='I look at the shape in the image.'"],
    ),
}


def cells(axes: dict[str, list[str]], fixed: list[str]) -> list[list[str]]:
    """Every combination of the sweep axes as a list of overrides (a key with commas sets several keys)."""
    result = []
    for values in itertools.product(*axes.values()):
        overrides = []
        for key, value in zip(axes, values, strict=True):
            overrides += [f"{k}={v}" for k, v in zip(key.split(","), value.split(","), strict=True)]
        result.append(overrides + fixed)
    return result


def multirun_command(axes: dict[str, list[str]], fixed: list[str]) -> str:
    """The Hydra multirun(s) that run the same cells one after another: one per value of a paired axis
    (keys joined by commas move together, which a single Hydra sweep cannot express)."""
    paired = {key: values for key, values in axes.items() if "," in key}
    sweeps = [f"{key}={','.join(values)}" for key, values in axes.items() if "," not in key]
    commands = []
    for values in itertools.product(*paired.values()):
        pairs = [
            f"{k}={v}"
            for key, value in zip(paired, values, strict=True)
            for k, v in zip(key.split(","), value.split(","), strict=True)
        ]
        parts = pairs + sweeps + fixed
        commands.append("python -m vrft.train -m " + " ".join(shlex.quote(part) for part in parts))
    return "\n".join(commands)


def cell_name(overrides: list[str], fixed: list[str] = ()) -> str:
    """A folder name from the overrides that vary (experiment and precision by value alone)."""
    keep = [o.split("=", 1)[1] if o.startswith(("+experiment=", "precision=")) else o for o in overrides]
    keep = [k for k, o in zip(keep, overrides, strict=True) if o not in fixed]
    return re.sub(r"[^A-Za-z0-9._]+", "-", "_".join(keep))


AFTER_EACH_LOCK = threading.Lock()  # one `--after-each` command at a time


def run_cell(overrides: list[str], folder: Path, deadline: float, after_each: str = "") -> str:
    """Run one cell into `folder`, killed at `deadline` (time.monotonic()); returns its status.

    `after_each`: a shell command run when the cell ended by itself (not when it was stopped at the deadline:
    the caller collects those once), one at a time, e.g. packing the finished runs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    timeout = deadline - time.monotonic()
    if timeout < 30:
        (folder / "status.txt").write_text("skipped: no time left\n")
        return "skipped"
    command = [sys.executable, "-m", "vrft.train", *overrides, f"run_dir={folder}", f"hydra.run.dir={folder}"]
    (folder / "command.txt").write_text(" ".join(command[1:]) + "\n")
    start = time.perf_counter()
    try:
        with (folder / "train.log").open("w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        status = "ok" if code == 0 else f"exit {code}"
    except subprocess.TimeoutExpired:
        status = "timeout"
    status += f" ({time.perf_counter() - start:.0f} s)"
    (folder / "status.txt").write_text(status + "\n")
    print(f"{folder.name}: {status}", flush=True)
    if after_each and not status.startswith("timeout"):
        with AFTER_EACH_LOCK:
            subprocess.run(after_each, shell=True, check=False)
    return status


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--matrix", choices=sorted(MATRICES), required=True)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--jobs", type=int, default=8, help="cells run at once")
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds for the whole matrix")
    parser.add_argument("--print-multirun", action="store_true", help="print the Hydra multirun and exit")
    parser.add_argument(
        "--only",
        default="",
        help="run only the cells whose name contains this text (or one of these, comma-separated)",
    )
    parser.add_argument(
        "--after-each",
        default="",
        help="shell command run after each cell that ended by itself (one at a time), e.g. packing the results",
    )
    parser.add_argument("extra", nargs="*", help="overrides added to every cell")
    args = parser.parse_args()
    axes, fixed = MATRICES[args.matrix]
    fixed = fixed + args.extra
    if args.print_multirun:
        print(multirun_command(axes, fixed))
        return
    wanted = args.only.split(",")
    todo = [cell for cell in cells(axes, fixed) if any(text in cell_name(cell, fixed) for text in wanted)]
    deadline = time.monotonic() + args.deadline
    runs = args.out / "runs"
    # Cells that share a warm start wait on its cache lock while the first of them makes it.
    with ThreadPoolExecutor(args.jobs) as pool:
        for overrides in todo:
            pool.submit(run_cell, overrides, runs / cell_name(overrides, fixed), deadline, args.after_each)


if __name__ == "__main__":
    main()
