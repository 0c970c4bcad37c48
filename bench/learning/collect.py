"""Copy the small files of each run folder (metrics, held-out results, logged completions, command, status,
log tail) elsewhere.

    python bench/learning/collect.py RUNS_PARENT DEST

Run folders also hold checkpoints and adapters (tens of MB each); the figures need none of them.
"""

import shutil
import sys
from pathlib import Path

KEEP = ("held_out.json", "command.txt", "status.txt", "run_summary.json", "config.yaml", "samples.jsonl")


def main(source: Path, dest: Path) -> None:
    for run in sorted((source / "runs").iterdir()):
        target = dest / run.name
        target.mkdir(parents=True, exist_ok=True)
        for name in KEEP:
            if (run / name).exists():
                shutil.copy(run / name, target / name)
        metrics = run / "logs" / "metrics.csv"
        if metrics.exists():
            shutil.copy(metrics, target / "metrics.csv")
        log = run / "train.log"
        if log.exists():
            (target / "train.log").write_text(log.read_text(errors="replace")[-6000:])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
