"""`python -m vrft.data.build detection-eval`: every (image, category) pair, absent categories included."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.data.test_builders import write_coco
from vrft.data.build import main
from vrft.data.eval_splits import CATEGORY_SETS, build_detection_eval_rows, category_list
from vrft.data.loading import load_visual_rft
from vrft.evaluation.evaluators import DetectionEvaluator
from vrft.evaluation.records import OPTIONAL_RECORD_KEYS, PredictionLog, PredictionWriter
from vrft.evaluation.rows import EvalRowDataset, prepare_rows


def test_every_image_is_asked_about_every_category(tmp_path):
    annotations, images = write_coco(tmp_path)
    rows = build_detection_eval_rows(annotations, images, "cat,bird")["test"].remove_columns("image")
    assert [(r["image_id"], r["category"]) for r in rows] == [
        (i, c) for i in (1, 2, 3, 4) for c in ("cat", "bird")
    ]
    absent = {(r["image_id"], r["category"]) for r in rows if r["solution"] == "<answer>No Objects</answer>"}
    assert absent == {(1, "bird"), (2, "bird"), (3, "bird"), (4, "bird"), (4, "cat")}


def test_lvis_asks_only_where_presence_or_absence_is_known(tmp_path):
    annotations, images = write_coco(tmp_path, lvis=True)
    rows = build_detection_eval_rows(annotations, images, ["dog"])["test"]
    # dog: boxes in image 1 (image 2's is a crowd box), known absent from image 4 only.
    assert sorted(zip(rows["image_id"], rows["solution"], strict=True))[1] == (
        4,
        "<answer>No Objects</answer>",
    )
    assert rows["image_id"] == [1, 4]


@pytest.mark.parametrize("max_images", [0, -1])
def test_max_images_below_one_is_refused_by_the_builder(tmp_path, max_images):
    # only the command line checked it: a Python call with 0 read "no image ... was found", -1 random.sample's words
    annotations, images = write_coco(tmp_path)
    with pytest.raises(
        ValueError, match=rf"^max_images={max_images} must be at least 1 \(images sampled\); leave"
    ):
        build_detection_eval_rows(annotations, images, "cat", max_images=max_images)


def test_named_category_sets_and_the_command(tmp_path, capsys):
    assert category_list("coco-8") == CATEGORY_SETS["coco-8"] and len(CATEGORY_SETS["lvis-rare"]) == 6
    annotations, images = write_coco(tmp_path)
    out = tmp_path / "eval"
    main(
        [
            "detection-eval",
            "--annotations",
            str(annotations),
            "--images",
            str(images),
            "--categories",
            "cat,dog",
            "--max-images",
            "2",
            "--out",
            str(out),
        ]
    )
    assert f"data.path={out} split=test" in capsys.readouterr().out
    assert len(load_visual_rft(out)["test"]) == 4
    with pytest.raises(SystemExit):
        main(
            [
                "detection-eval",
                "--annotations",
                str(annotations),
                "--images",
                str(images),
                "--out",
                str(out / "x"),
            ]
        )
    assert "not in" in capsys.readouterr().err


def test_an_underscore_spells_a_space_in_a_category_name(tmp_path):
    # `fire_hydrant` worked for the training set's builder but was an unknown category here
    annotations, images = write_coco(tmp_path)
    coco = json.loads(annotations.read_text())
    coco["categories"][1]["name"] = "hot dog"
    annotations.write_text(json.dumps(coco))
    rows = build_detection_eval_rows(annotations, images, "cat,hot_dog")["test"]
    assert set(rows["category"]) == {"cat", "hot dog"} and "category 'hot dog'" in rows["problem"][1]


def test_rows_carry_crowd_regions_and_boxes_too_thin_for_the_grid(tmp_path):
    # image 2's only dog is a crowd region: asked ("No Objects"), the region carried. A cat 0.02 pixels wide
    # (a third of a grid step) vanishes on the grid of the 64 x 64 image 4 but is still a box the official
    # evaluation counts.
    annotations, images = write_coco(tmp_path)
    coco = json.loads(annotations.read_text())
    coco["annotations"].append({"id": 7, "image_id": 4, "category_id": 1, "bbox": [1, 2, 0.02, 10]})
    annotations.write_text(json.dumps(coco))
    rows = build_detection_eval_rows(annotations, images, "cat,dog")["test"].remove_columns("image")
    by_pair = {(r["image_id"], r["category"]): r for r in rows}
    assert by_pair[(2, "dog")]["solution"] == "<answer>No Objects</answer>"
    assert by_pair[(2, "dog")]["crowd_boxes"] == [[0.0, 0.0, 100.0, 100.0]]
    assert by_pair[(2, "dog")]["pixel_boxes"] == []
    assert by_pair[(4, "cat")]["solution"] == "<answer>No Objects</answer>"
    assert by_pair[(4, "cat")]["pixel_boxes"] == [[1.0, 2.0, 1.02, 12.0]]
    assert not any(rows["not_exhaustive"])


def _built_map(tmp_path, annotations, images, answer: str) -> tuple[float, float]:
    """mAP of `answer` on every row of `detection-eval` on `annotations`, through vrft.evaluate's path (rows,
    predictions.jsonl records, evaluator): with the rows' ground-truth columns, and from the solutions
    alone."""
    out = tmp_path / "eval"
    command = [
        "detection-eval",
        "--annotations",
        str(annotations),
        "--images",
        str(images),
        "--categories",
        "cat",
    ]
    main([*command, "--out", str(out)])
    rows = prepare_rows(load_visual_rft(out)["test"], "test", "detection")
    batch = [row for row in EvalRowDataset(rows, rows.indices)]
    log = PredictionLog(tmp_path / "predictions.jsonl")
    evaluator = DetectionEvaluator()
    writer = PredictionWriter(log, "base", lambda c, s, columns: ([0.0] * len(c), {}), evaluator.answer, 1)
    module = SimpleNamespace(predictions=[{"completion": answer} for _ in batch])
    writer.on_validation_start(None, module)
    writer.on_validation_batch_end(None, module, None, batch, 0)
    writer.on_validation_end(None, module)
    records = log.of("base")
    solutions_only = [{k: v for k, v in r.items() if k not in OPTIONAL_RECORD_KEYS} for r in records]
    return (
        evaluator([answer] * len(records), records)["map"],
        evaluator([answer] * len(records), solutions_only)["map"],
    )


CAT_BOX = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100]}
STRAY_FIRST = (
    "<answer>[{'Position': [600, 600, 700, 700], 'Confidence': 0.9}, "
    "{'Position': [0, 0, 100, 100], 'Confidence': 0.8}]</answer>"
)


@pytest.mark.parametrize(
    ("size", "annotations", "not_exhaustive", "answer", "official", "from_solutions"),
    [
        # COCO: the 0.9 box lies on a crowd region of cats; the official evaluation ignores it (AP 1), the
        # solution alone makes it a false positive ranked first (AP 0.5)
        (
            (1000, 1000),
            [CAT_BOX, {"id": 2, "image_id": 1, "category_id": 1, "bbox": [500, 500, 400, 400], "iscrowd": 1}],
            False,
            STRAY_FIRST,
            1.0,
            0.5,
        ),
        # LVIS: cats are not exhaustively annotated in the image, so the unmatched 0.9 box is ignored
        ((1000, 1000), [CAT_BOX], True, STRAY_FIRST, 1.0, 0.5),
        # 2000 x 2000: the box [0, 0, 100, 133.2] is [0, 0, 50, 67] on the grid ([0, 0, 100, 134] pixels); the
        # answer (pixels [0, 0, 100, 100]) has IoU 0.7508 with the file's box (6 of 10 thresholds), 0.7463
        # with the rounded one (5 of 10)
        (
            (2000, 2000),
            [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 133.2]}],
            False,
            "<answer>[{'Position': [0, 0, 50, 50], 'Confidence': 0.9}]</answer>",
            0.6,
            0.5,
        ),
    ],
    ids=["coco-crowd", "lvis-not-exhaustive", "exact-pixels"],
)
def test_built_rows_give_the_official_map(
    tmp_path, size, annotations, not_exhaustive, answer, official, from_solutions
):
    annotation_file, images = write_coco(
        tmp_path, images={1: size}, lvis=not_exhaustive, annotations=annotations
    )
    if not_exhaustive:
        coco = json.loads(annotation_file.read_text())
        coco["images"][0]["not_exhaustive_category_ids"] = [1]
        annotation_file.write_text(json.dumps(coco))
    measured, rounded = _built_map(tmp_path, annotation_file, images, f"<think>x</think>{answer}")
    assert measured == pytest.approx(official)
    assert rounded == pytest.approx(from_solutions)  # what the evaluation gave before the rows carried more
