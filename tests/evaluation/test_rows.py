"""Evaluation rows derived from Visual-RFT's three columns, checked before decoding."""

from __future__ import annotations

import datasets
import pytest
from PIL import Image

from tests.evaluation.support import CAT, schema_rows
from vrft.data.prompts import detection_prompt
from vrft.evaluation.evaluators import DetectionEvaluator
from vrft.evaluation.rows import EvalRowDataset, category_from_prompt, detection_category, prepare_rows
from vrft.rewards import check_detection_solution


def test_category_comes_from_column_then_prompt_then_solution():
    assert detection_category({"category": "bus", "problem": detection_prompt("cat")}) == "bus"
    assert category_from_prompt(detection_prompt("fire hydrant")) == "fire hydrant"
    entry = "<answer>[{'Position': [1, 2, 3, 4], 'Confidence': 1, 'Category': 'dog'}]</answer>"
    assert detection_category({"problem": "Find the objects.", "solution": entry}) == "dog"
    with pytest.raises(ValueError, match="no 'category' column.*solution names no class"):
        detection_category({"problem": "Find the objects.", "solution": CAT})


def test_image_ids_are_content_hashes_shared_by_one_image():
    table = datasets.Dataset.from_list(schema_rows("detection")).cast_column(
        "image", datasets.Image(decode=False)
    )
    rows = prepare_rows(table, "test", "detection", check_detection_solution)
    ids = [rows.columns[i]["image_id"] for i in rows.indices]
    assert ids[0] == ids[1] != ids[2] == ids[3]
    with_ids = table.add_column("image_id", [7, 7, 9, 9])
    assert [c["image_id"] for c in prepare_rows(with_ids, "test", "detection").columns.values()] == [
        7,
        7,
        9,
        9,
    ]


def test_skip_drops_bad_rows_and_keeps_them_listed():
    table = datasets.Dataset.from_list(schema_rows("detection")).cast_column(
        "image", datasets.Image(decode=False)
    )
    table = table.map(
        lambda row, i: {"solution": "nonsense" if i == 2 else row["solution"]}, with_indices=True
    )
    with pytest.raises(ValueError, match=r"1 bad row\(s\) in split 'test' \(rows 2\)"):
        prepare_rows(table, "test", "detection", check_detection_solution)
    rows = prepare_rows(table, "test", "detection", check_detection_solution, on_bad_row="skip")
    assert rows.indices == [0, 1, 3] and [index for index, _ in rows.bad] == [2]


def test_row_without_a_problem_is_listed_instead_of_asking_none():
    table = datasets.Dataset.from_list(schema_rows("detection")).cast_column(
        "image", datasets.Image(decode=False)
    )
    table = table.map(lambda row, i: {"problem": None if i == 1 else row["problem"]}, with_indices=True)
    with pytest.raises(
        ValueError, match=r"1 bad row\(s\) in split 'test' \(rows 1\); row 1: problem None is empty"
    ):
        prepare_rows(table, "test", "detection", check_detection_solution)


def detection_table_of_two_sizes(image_ids: list) -> datasets.Dataset:
    rows = schema_rows("detection")
    for row in rows[2:]:  # the second image, asked about both categories, is wider than the first
        row["image"] = Image.new("RGB", (80, 56), (30, 30, 200))
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image(decode=False))
    return table.add_column("image_id", image_ids)


def test_null_image_ids_fall_back_to_content_hashes():
    # every null id was one COCO image: the metric refused it (two sizes) only after the whole split was decoded
    rows = prepare_rows(
        detection_table_of_two_sizes([None] * 4), "test", "detection", check_detection_solution
    )
    ids = [rows.columns[i]["image_id"] for i in rows.indices]
    assert None not in ids and ids[0] == ids[1] != ids[2] == ids[3]
    dataset = EvalRowDataset(rows, rows.indices)
    truth = [dataset[position] for position in range(len(dataset))]
    assert DetectionEvaluator()([row["solution"] for row in truth], truth)["map"] == pytest.approx(1.0)


def test_an_image_id_shared_by_images_of_two_sizes_is_a_bad_row_before_decoding():
    table = detection_table_of_two_sizes([7, 7, 7, 7])
    with pytest.raises(
        ValueError, match=r"rows 2, 3\); row 2: image_id 7 is also row 0's, whose image is 56x56"
    ):
        prepare_rows(table, "test", "detection", check_detection_solution)
    rows = prepare_rows(table, "test", "detection", check_detection_solution, on_bad_row="skip")
    assert rows.indices == [0, 1] and [index for index, _ in rows.bad] == [2, 3]


def test_unreadable_ground_truth_columns_are_bad_rows_before_decoding():
    # the columns vrft.data.build writes are optional (null is as absent), but a hand-made value the metric
    # cannot read is named before any row is decoded, not at the metric after all of them
    table = datasets.Dataset.from_list(schema_rows("detection")).cast_column(
        "image", datasets.Image(decode=False)
    )
    table = table.add_column("pixel_boxes", [None, [[0.0, 0.0, 5.0, 5.0]], [[1.0, 2.0]], None])
    table = table.add_column("not_exhaustive", [None, False, False, True])
    with pytest.raises(
        ValueError, match=r"rows 2\); row 2: pixel_boxes \[\[1\.0, 2\.0\]\], not a list of \[x1, y1, x2, y2\]"
    ):
        prepare_rows(table, "test", "detection", check_detection_solution)
    rows = [{"problem": "p", "category": "cat", "solution": CAT, "crowd_boxes": "everywhere"}]
    with pytest.raises(ValueError, match=r"\(rows 0\) have crowd_boxes 'everywhere', not a list of \["):
        DetectionEvaluator().check_rows(rows, "val")
    with pytest.raises(ValueError, match=r"have not_exhaustive 'yes', not true or false"):
        DetectionEvaluator().check_rows([{"category": "cat", "not_exhaustive": "yes"}], "val")
    DetectionEvaluator().check_rows([{"category": "cat", "pixel_boxes": None, "not_exhaustive": None}], "val")
    good = prepare_rows(table.select([0, 1, 3]), "test", "detection", check_detection_solution)
    assert good.indices == [0, 1, 2]
