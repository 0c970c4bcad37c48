"""The memory/speed benchmark matrix: every row in its own process, with a timeout, in one device call.

    python bench/memory/run_matrix.py --out $OUT [--only NAME,NAME] [--deadline 560]

Each row is `run_row.py` with its overrides (see `ROWS`); its JSON record is appended to
`<out>/rows.jsonl` as soon as the row ends (a row that fails or times out is recorded as such), so a call
that runs out of time still returns every finished row. `make_table.py` turns the records into
`bench/memory/results/*.json` and the table in `bench/README.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from rows import ROWS, Row  # noqa: E402


def run(row: Row, out: Path, images: Path, log, jobs: int = 1) -> dict:
    target = out / f"{row.name}.json"
    command = [sys.executable, str(HERE / "run_row.py"), "--name", row.name, "--images", str(images)]
    command += ["--out", str(target), "--speed", row.speed, "--concurrent", str(jobs)]
    command += ["--", *row.overrides, *row.extra]
    start = time.perf_counter()
    log_path = out / f"{row.name}.log"
    try:
        with log_path.open("w") as row_log:
            result = subprocess.run(command, stdout=row_log, stderr=subprocess.STDOUT, timeout=row.timeout)
        status = "ok" if result.returncode == 0 else f"exit {result.returncode}"
    except subprocess.TimeoutExpired:
        status = f"timeout after {row.timeout} s"
    record = (
        json.loads(target.read_text()) if target.exists() else {"name": row.name, "overrides": row.overrides}
    )
    record["status"] = status
    record["wall_seconds"] = time.perf_counter() - start
    log.write(f"\n===== {row.name}: {' '.join(row.overrides)} ({status})\n")
    log.write(log_path.read_text(errors="replace")[-20000:] if log_path.exists() else "")
    log.flush()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--only", default="", help="comma-separated row names")
    parser.add_argument(
        "--deadline", type=float, default=560.0, help="seconds; rows that cannot finish are skipped"
    )
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every row (CPU checks)")
    parser.add_argument("--jobs", type=int, default=1, help="memory-only rows run this many at a time")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path("/tmp/vrft-bench")
    scratch.mkdir(parents=True, exist_ok=True)
    images = scratch / "images"
    if not images.exists():
        subprocess.run([sys.executable, str(HERE / "make_images.py"), str(images)], check=True)
    rows = [r for r in ROWS if not args.only or r.name in args.only.split(",")]
    start = time.perf_counter()
    lock = threading.Lock()

    def one(row: Row, jobs: int) -> None:
        left = args.deadline - (time.perf_counter() - start)
        if left < 30:
            print(f"skipped {row.name}: {left:.0f} s left", flush=True)
            return
        row.timeout = int(min(row.timeout, left))
        row.extra = args.extra
        record = run(row, scratch, images, log, jobs)
        with lock:
            sink.write(json.dumps(record) + "\n")
            sink.flush()
        measured = record.get("measured") or {}
        planned = (record.get("plan") or {}).get("peak_reserved_gb")
        print(
            f"{row.name}: {record['status']} in {record['wall_seconds']:.0f} s, peak reserved "
            f"{measured.get('peak_reserved_gb')} GiB, planned {planned}",
            flush=True,
        )

    with (args.out / "matrix.log").open("w") as log, (args.out / "rows.jsonl").open("a") as sink:
        # Speed rows alone (their timings are the ones reported), the memory-only rows side by side:
        # each process has its own allocator and cap, so their peaks do not mix; their timings do.
        for row in [r for r in rows if r.speed]:
            one(row, 1)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda r: one(r, args.jobs), [r for r in rows if not r.speed]))


if __name__ == "__main__":
    main()
