"""Detection mAP (COCO/LVIS) against hand-computed values."""

from __future__ import annotations

import math

import pytest

from vrft.evaluation.mean_ap import BoxSet, detection_map

# On a 1000 x 1000 image the 0..1000 grid is the pixel grid, so boxes below are also pixels.
SIZE = 1000


def boxes(image_id, category, *xyxy, scores=None):
    return BoxSet(image_id, category, SIZE, SIZE, boxes=list(xyxy), scores=scores)


def test_perfect_predictions_score_one():
    truth = [boxes(1, "cat", (0, 0, 100, 100), (200, 200, 400, 300)), boxes(2, "dog", (500, 500, 900, 800))]
    predictions = [
        boxes(1, "cat", (0, 0, 100, 100), (200, 200, 400, 300), scores=[0.9, 0.8]),
        boxes(2, "dog", (500, 500, 900, 800), scores=[0.7]),
    ]
    result = detection_map(predictions, truth, ["cat", "dog"])
    assert result["map"] == pytest.approx(1.0)
    assert result["map_50"] == pytest.approx(1.0)
    assert result["num_classes"] == 2


def test_false_positive_ranked_first_halves_precision():
    # One true box. The 0.9 detection misses, the 0.8 one is exact: precision is 0/1 then 1/2 at
    # recall 1, so the interpolated precision is 0.5 at every recall threshold and every IoU threshold.
    truth = [boxes(1, "cat", (0, 0, 100, 100))]
    predictions = [boxes(1, "cat", (500, 500, 600, 600), (0, 0, 100, 100), scores=[0.9, 0.8])]
    result = detection_map(predictions, truth, ["cat"])
    assert result["map"] == pytest.approx(0.5)
    assert result["map_50"] == pytest.approx(0.5)
    # Ranked the other way round the false positive comes after full recall and costs nothing.
    predictions = [boxes(1, "cat", (500, 500, 600, 600), (0, 0, 100, 100), scores=[0.1, 0.8])]
    assert detection_map(predictions, truth, ["cat"])["map"] == pytest.approx(1.0)


def test_one_class_perfect_one_missed_averages_to_half():
    truth = [boxes(1, "cat", (0, 0, 100, 100)), boxes(1, "dog", (300, 300, 500, 500))]
    predictions = [boxes(1, "cat", (0, 0, 100, 100), scores=[0.9]), boxes(1, "dog")]  # "No Objects" for dog
    result = detection_map(predictions, truth, ["cat", "dog"])
    assert result["per_class"]["cat"]["map"] == pytest.approx(1.0)
    assert result["per_class"]["dog"]["map"] == 0.0
    assert result["map"] == pytest.approx(0.5)


def test_iou_072_matches_half_of_the_thresholds():
    # IoU 7200 / 10000 = 0.72 passes thresholds .50 .55 .60 .65 .70 (5 of 10): mAP 0.5, mAP@.50 1.
    truth = [boxes(1, "cat", (0, 0, 100, 100))]
    predictions = [boxes(1, "cat", (0, 0, 100, 72), scores=[0.9])]
    result = detection_map(predictions, truth, ["cat"])
    assert result["map"] == pytest.approx(0.5)
    assert result["map_50"] == pytest.approx(1.0)


def test_class_without_ground_truth_is_left_out():
    truth = [boxes(1, "cat", (0, 0, 100, 100)), boxes(1, "bird")]
    predictions = [
        boxes(1, "cat", (0, 0, 100, 100), scores=[0.9]),
        boxes(1, "bird", (5, 5, 50, 50), scores=[0.4]),
    ]
    result = detection_map(predictions, truth, ["cat", "bird"])
    assert math.isnan(result["per_class"]["bird"]["map"])
    assert result["map"] == pytest.approx(1.0)
    assert result["num_classes"] == 1
    assert math.isnan(detection_map([], [boxes(1, "bird")], ["bird"])["map"])


def test_both_conventions_on_a_non_square_image():
    # IoU is invariant to scaling each axis, so the grid and pixel forms of the same boxes score alike:
    # grid [100, 100, 300, 400] on 200 x 100 is pixels [20, 10, 60, 40]; the prediction covers half of it.
    grid_truth = [BoxSet("a", "cat", 200, 100, boxes=[(100, 100, 300, 400)])]
    grid_prediction = [BoxSet("a", "cat", 200, 100, boxes=[(100, 100, 300, 250)], scores=[1.0])]
    pixel_truth = [BoxSet("a", "cat", 200, 100, boxes=[(20, 10, 60, 40)])]
    pixel_prediction = [BoxSet("a", "cat", 200, 100, boxes=[(20, 10, 60, 25)], scores=[1.0])]
    grid = detection_map(grid_prediction, grid_truth, ["cat"], coord_convention="qwen2vl")
    pixels = detection_map(pixel_prediction, pixel_truth, ["cat"], coord_convention="absolute")
    # IoU 0.5 passes only the .50 threshold: mAP 1/10, mAP@.50 1.
    assert grid["map"] == pytest.approx(0.1) and pixels["map"] == pytest.approx(0.1)
    assert grid["map_50"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="coord_convention"):
        detection_map(grid_prediction, grid_truth, ["cat"], coord_convention="xywh")


def test_a_detection_on_a_crowd_region_is_ignored_not_a_false_positive():
    # The 0.9 detection lies inside the crowd region (its crowd IoU, the share inside, is 1): ignored, as the
    # official COCO evaluation does, so the exact 0.8 one alone gives AP 1. Without the region it is the
    # false positive ranked first of test_false_positive_ranked_first_halves_precision: 0.5.
    truth = [BoxSet(1, "cat", SIZE, SIZE, boxes=[(0, 0, 100, 100)], crowd_boxes=[(500, 500, 900, 900)])]
    predictions = [boxes(1, "cat", (600, 600, 700, 700), (0, 0, 100, 100), scores=[0.9, 0.8])]
    assert detection_map(predictions, truth, ["cat"])["map"] == pytest.approx(1.0)
    # A quarter of this one lies in the region (crowd IoU 0.25 < .50): a false positive again.
    predictions = [boxes(1, "cat", (450, 450, 550, 550), (0, 0, 100, 100), scores=[0.9, 0.8])]
    assert detection_map(predictions, truth, ["cat"])["map"] == pytest.approx(0.5)


def test_where_a_category_is_not_exhaustive_unmatched_detections_are_ignored():
    # LVIS not_exhaustive_category_ids: the 0.9 detection matches no box and is ignored (even one reaching
    # past the image), the exact 0.8 one gives AP 1. Exhaustively annotated, the first is a false positive.
    truth = [BoxSet(1, "cat", SIZE, SIZE, boxes=[(0, 0, 100, 100)], exhaustive=False)]
    for stray in ((500, 500, 600, 600), (900, 900, 1200, 1300)):
        predictions = [boxes(1, "cat", stray, (0, 0, 100, 100), scores=[0.9, 0.8])]
        assert detection_map(predictions, truth, ["cat"])["map"] == pytest.approx(1.0)
    exhaustive = [boxes(1, "cat", (0, 0, 100, 100))]
    assert detection_map(predictions, exhaustive, ["cat"])["map"] == pytest.approx(0.5)
    # The box itself still counts: missed, it is AP 0 (the unmatched detection costs nothing, finds nothing).
    missed = [boxes(1, "cat", (500, 500, 600, 600), scores=[0.9])]
    assert detection_map(missed, truth, ["cat"])["map"] == 0.0


def test_ground_truth_in_pixels_is_compared_unrounded():
    # On a 2000 x 2000 image one grid step is 2 pixels. The true box [0, 0, 100, 133.2] is [0, 0, 50, 67] on
    # the grid, i.e. [0, 0, 100, 134] pixels. The prediction [0, 0, 50, 50] (pixels [0, 0, 100, 100]) has IoU
    # 100 / 133.2 = 0.7508 with the exact box (thresholds .50 to .75: 6 of 10) but 100 / 134 = 0.7463 with
    # the rounded one (.50 to .70: 5 of 10).
    predictions = [BoxSet(1, "cat", 2000, 2000, boxes=[(0, 0, 50, 50)], scores=[0.9])]
    exact = [BoxSet(1, "cat", 2000, 2000, boxes=[(0, 0, 100, 133.2)], in_pixels=True)]
    rounded = [BoxSet(1, "cat", 2000, 2000, boxes=[(0, 0, 50, 67)])]
    assert detection_map(predictions, exact, ["cat"])["map"] == pytest.approx(0.6)
    assert detection_map(predictions, rounded, ["cat"])["map"] == pytest.approx(0.5)
    # pixels whatever the task's convention
    assert detection_map(predictions, exact, ["cat"], coord_convention="absolute")["map"] == 0.0


def test_box_set_from_answer_reads_completions_and_solutions():
    completion = "<think>t</think><answer>[{'Position': [0, 0, 100, 100], 'Confidence': 0.75}]</answer>"
    predicted = BoxSet.from_answer(completion, 1, "cat", SIZE, SIZE)
    assert list(predicted.boxes) == [(0, 0, 100, 100)] and list(predicted.scores) == [0.75]
    assert list(BoxSet.from_answer("<answer>No Objects</answer>", 1, "cat", SIZE, SIZE).boxes) == []
    assert list(BoxSet.from_answer("garbage", 1, "cat", SIZE, SIZE).boxes) == []
    truth = BoxSet.from_answer(
        "<answer>[{'Position': [0, 0, 100, 100], 'Confidence': 1}]</answer>", 1, "cat", 1000, 1000
    )
    assert detection_map([predicted], [truth], ["cat"])["map"] == pytest.approx(1.0)


def test_detection_map_is_silent(capsys):
    detection_map([boxes(1, "cat", (0, 0, 10, 10), scores=[0.5])], [boxes(1, "cat", (0, 0, 10, 10))], ["cat"])
    assert capsys.readouterr().out == ""


def test_inconsistent_inputs_are_named():
    with pytest.raises(ValueError, match="same width and height"):
        detection_map([BoxSet(1, "cat", 10, 10)], [BoxSet(1, "cat", 20, 10)], ["cat"])
    with pytest.raises(ValueError, match="one score per box"):
        BoxSet(1, "cat", 10, 10, boxes=[(0, 0, 1, 1)], scores=[])
    with pytest.raises(ValueError, match="pixel size"):
        BoxSet(1, "cat", 0, 10)
    with pytest.raises(ValueError, match=r"crowd_boxes of image 1 must be \[x1, y1, x2, y2\]"):
        BoxSet(1, "cat", 10, 10, crowd_boxes=[(0, 0, 1)])
