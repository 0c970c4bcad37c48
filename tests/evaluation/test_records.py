"""`predictions.jsonl` records carry what the metric reads from each row."""

from __future__ import annotations

from types import SimpleNamespace

from vrft.evaluation.records import PredictionLog, PredictionWriter


def test_records_carry_the_official_ground_truth_columns_only_where_rows_have_them(tmp_path):
    # vrft.evaluate computes the metric from these records, not from the rows: a column left out here would
    # be left out of the metric too
    rows = [
        {"row_index": 0, "solution": "s", "category": "cat", "image_id": 1, "image_size": (10, 10)},
        {
            "row_index": 1,
            "solution": "s",
            "category": "cat",
            "image_id": 2,
            "image_size": (10, 10),
            "pixel_boxes": [[0.0, 0.0, 5.5, 5.0]],
            "crowd_boxes": [],
            "not_exhaustive": False,
        },
    ]
    log = PredictionLog(tmp_path / "predictions.jsonl")
    writer = PredictionWriter(log, "base", lambda c, s, columns: ([0.0] * len(c), {}), lambda c: None, 2)
    module = SimpleNamespace(predictions=[{"completion": "a"}, {"completion": "b"}])
    writer.on_validation_start(None, module)
    writer.on_validation_batch_end(None, module, None, rows, 0)
    writer.on_validation_end(None, module)
    first, second = PredictionLog(log.path).of("base")
    assert not {"pixel_boxes", "crowd_boxes", "not_exhaustive"} & set(first)
    assert (second["pixel_boxes"], second["crowd_boxes"], second["not_exhaustive"]) == (
        [[0.0, 0.0, 5.5, 5.0]],
        [],
        False,
    )
