"""`predictions.jsonl`: every decoded row written the moment its batch is decoded, and read back to resume.

One JSON object per line: which model (`model`: "base" or the adapter), which row (`row_index`), the raw
`completion`, the parsed `answer`, the per-row `reward` (the task's weighted total) and its parts, plus what
the metric needs (`solution`, `category`, `image_id`, `image_size`, and where the row has them
`pixel_boxes`, `crowd_boxes`, `not_exhaustive`). A line cut off by an interrupted write
is dropped when the file is read back, so a resumed run decodes that row again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from tqdm.auto import tqdm
from typing_extensions import override

from vrft.modules.scoring import RewardSet
from vrft.paths import write_atomic

log = logging.getLogger(__name__)

RECORD_KEYS = ("row_index", "solution", "category", "image_id", "image_size")
# Written only where the row has them (rows built by vrft.data.build): the official COCO/LVIS ground truth.
OPTIONAL_RECORD_KEYS = ("pixel_boxes", "crowd_boxes", "not_exhaustive")


class PredictionLog:
    """Append-only JSONL of decoded rows; `done` says which (model, row) pairs are already in it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():
            self.records = _read_complete_lines(self.path)
            # Rewrite without a half-written last line, so that appending continues a valid file; whole or
            # not at all, since a stop or a full disk mid-rewrite would lose the rows already decoded.
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def done(self, model: str) -> set[int]:
        """Row indices of `model` already decoded."""
        return {r["row_index"] for r in self.records if r["model"] == model}

    def of(self, model: str) -> list[dict]:
        """The records of `model`, in row order."""
        return sorted((r for r in self.records if r["model"] == model), key=lambda r: r["row_index"])

    def append(self, records: Sequence[dict]) -> None:
        """Write `records` and flush them to disk before returning (a crash after this loses none)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            for record in records:
                file.write(json.dumps(record, default=str) + "\n")
            file.flush()
            os.fsync(file.fileno())
        self.records.extend(records)


def _read_complete_lines(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning(
                "dropping unreadable line %d of %s (an interrupted write); it is decoded again", number, path
            )
    return records


class PredictionWriter(L.Callback):
    """After each validation batch: score the batch's completions and append them to the `PredictionLog`.

    Also shows a progress bar in rows (with rows/s) instead of Lightning's per-batch one.

    Args:
        log: where records go.
        model: the label of the evaluated model ("base" or the adapter).
        rewards: the task's rewards; each record gets the weighted total and every part.
        answer: the task's answer parser (completion -> JSON-able parsed answer).
        total: rows this pass decodes (for the progress bar).
    """

    def __init__(self, log: PredictionLog, model: str, rewards: RewardSet, answer, total: int):
        self.predictions, self.model, self.rewards, self.answer, self.total = (
            log,
            model,
            rewards,
            answer,
            total,
        )
        self.bar = None
        self.batch_ends: list[tuple[float, int]] = []  # (perf_counter, rows) at the end of each batch
        self.start = 0.0

    @override
    def on_validation_start(self, trainer, pl_module) -> None:
        self.bar = tqdm(total=self.total, unit=" rows", desc=f"decoding ({self.model})", dynamic_ncols=True)
        self.start = time.perf_counter()

    @override
    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        decoded = pl_module.predictions[-len(batch) :]
        completions = [p["completion"] for p in decoded]
        columns = {k: [row.get(k) for row in batch] for k in batch[0] if k not in ("image", "solution")}
        total, parts = self.rewards(completions, [row["solution"] for row in batch], columns)
        records = []
        for i, (completion, row) in enumerate(zip(completions, batch, strict=True)):
            record = {"model": self.model, **{k: row.get(k) for k in RECORD_KEYS}}
            record["image_size"] = list(row["image_size"])
            record |= {k: row[k] for k in OPTIONAL_RECORD_KEYS if row.get(k) is not None}
            record |= {"completion": completion, "answer": self.answer(completion), "reward": float(total[i])}
            record["rewards"] = {name: float(values[i]) for name, values in parts.items()}
            records.append(record)
        self.predictions.append(records)
        pl_module.predictions.clear()  # the log holds them; keeps memory flat over a long split
        self.bar.update(len(batch))
        self.batch_ends.append((time.perf_counter(), len(batch)))

    def speed(self) -> dict[str, float | None]:
        """Rows per second of this pass, and after its first batch (warm-up, graph capture excluded)."""
        if not self.batch_ends:
            return {"rows_per_s": None, "steady_rows_per_s": None}
        total = sum(rows for _, rows in self.batch_ends) / (self.batch_ends[-1][0] - self.start)
        if len(self.batch_ends) < 2:
            return {"rows_per_s": total, "steady_rows_per_s": None}
        after_first = sum(rows for _, rows in self.batch_ends[1:])
        return {
            "rows_per_s": total,
            "steady_rows_per_s": after_first / (self.batch_ends[-1][0] - self.batch_ends[0][0]),
        }

    @override
    def on_validation_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
