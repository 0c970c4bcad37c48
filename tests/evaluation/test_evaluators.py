"""Task evaluators over completions and dataset rows, as the validation loop and vrft.evaluate call them."""

import pytest

from tests.evaluation.support import CAT
from vrft.evaluation.evaluators import ClassificationEvaluator, DetectionEvaluator, GroundingEvaluator

ROWS = [
    {
        "solution": "<answer>[{'Position': [100, 100, 400, 400], 'Confidence': 1}]</answer>",
        "category": "circle",
        "row_index": 0,
        "image_size": (112, 112),
    },
    {
        "solution": "<answer>[{'Position': [500, 500, 900, 900], 'Confidence': 1}]</answer>",
        "category": "square",
        "row_index": 1,
        "image_size": (112, 112),
    },
]


def test_detection_perfect_answers_score_one():
    completions = [f"<think>x</think>{row['solution'].replace('1}', '0.9}')}" for row in ROWS]
    metrics = DetectionEvaluator()(completions, ROWS)
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics["map_50"] == pytest.approx(1.0)
    assert metrics["map/circle"] == pytest.approx(1.0)


def test_detection_half_right_averages_classes():
    completions = [ROWS[0]["solution"], "<answer>No Objects</answer>"]
    metrics = DetectionEvaluator()(completions, ROWS)
    # circle perfect (AP 1), square missed (AP 0): the class average is 0.5.
    assert metrics["map"] == pytest.approx(0.5)


def test_detection_needs_category_column():
    with pytest.raises(ValueError, match="'category' column"):
        DetectionEvaluator()(
            ["x"], [{"solution": "<answer>No Objects</answer>", "row_index": 0, "image_size": (8, 8)}]
        )


def test_classification_and_grounding():
    rows = [{"solution": "<answer>red circle</answer>"}, {"solution": "<answer>blue square</answer>"}]
    assert ClassificationEvaluator()(["<answer>Red_Circle</answer>", "<answer>green</answer>"], rows) == {
        "accuracy": 0.5,
        "accuracy/blue square": 0.0,
        "accuracy/red circle": 1.0,
    }
    boxes = [{"solution": "<answer>(0,0),(100,100)</answer>"}] * 2
    metrics = GroundingEvaluator()(
        ["<answer>(0,0),(100,100)</answer>", "<answer>(200,0),(300,100)</answer>"], boxes
    )
    # IoU 1 and 0; GIoU 1 and 0 - (300x100 hull - 2x100x100 union) / hull = -1/3.
    assert metrics["miou"] == pytest.approx(0.5) and metrics["giou"] == pytest.approx((1 - 1 / 3) / 2)


def test_classes_given_as_one_string_are_refused():
    # its letters became the known classes: an answer with the word "a" named another class and was wrong
    with pytest.raises(ValueError, match="task.classes='daisy,rose' is one string"):
        ClassificationEvaluator(classes="daisy,rose")


def test_detection_categories_as_one_string_are_a_comma_separated_list():
    # categories="cat" averaged over the letters c, a, t: no row asks about them, so mAP was NaN
    rows = [
        {"solution": CAT, "category": "cat", "row_index": 0, "image_size": (56, 56)},
        {"solution": CAT, "category": "fire hydrant", "row_index": 1, "image_size": (56, 56)},
    ]
    assert DetectionEvaluator(categories="cat").categories == ["cat"]
    assert DetectionEvaluator(categories="cat, fire hydrant").categories == ["cat", "fire hydrant"]
    assert DetectionEvaluator(categories="cat")([CAT, CAT], rows)["map"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"names \['dog'\], which no row of split 'test'"):
        DetectionEvaluator(categories="cat,dog").check_rows(rows, "test")


def test_detection_rows_with_a_null_image_id_are_one_image_each():
    # training's validation rows carry the dataset's image_id column as it is: its nulls were one COCO image,
    # refused for its two sizes (or merged when the sizes agreed) in the middle of training
    rows = [
        {"solution": CAT, "category": "cat", "row_index": 0, "image_size": (56, 56), "image_id": None},
        {"solution": CAT, "category": "cat", "row_index": 1, "image_size": (80, 56), "image_id": None},
        {"solution": CAT, "category": "cat", "row_index": 2, "image_size": (56, 56), "image_id": 0},
    ]
    assert DetectionEvaluator()([CAT, CAT, CAT], rows)["map"] == pytest.approx(1.0)


def test_detection_check_rows_names_rows_without_a_category_before_decoding():
    # training's validation rows reach the check as they are on disk: the metric stopped on such a row at the
    # first validation, after training steps
    rows = [
        {"problem": "Find every cat.", "solution": CAT, "category": "cat", "row_index": 0},
        {"problem": "Detect the category 'cat'.", "solution": CAT, "row_index": 1},
        {"problem": "Find every thing.", "solution": "<answer>No Objects</answer>", "row_index": 2},
    ]
    with pytest.raises(ValueError, match=r"split 'val': 1 row\(s\) \(rows 2\) have no detection category"):
        DetectionEvaluator().check_rows(rows, "val")
    DetectionEvaluator(categories="cat").check_rows(rows[:2], "val")  # from the column, or the prompt


def test_detection_categories_take_a_named_set_as_vrft_data_build_does():
    from vrft.data.eval_splits import CATEGORY_SETS

    assert DetectionEvaluator(categories="coco-8").categories == list(CATEGORY_SETS["coco-8"])


def _answer(*boxes_and_scores) -> str:
    entries = ", ".join(
        f"{{'Position': {list(box)}, 'Confidence': {score}}}" for box, score in boxes_and_scores
    )
    return f"<think>x</think><answer>[{entries}]</answer>"


def test_detection_ground_truth_columns_of_built_rows_give_the_official_numbers():
    # 2000 x 2000 image, one grid step 2 pixels: the annotated box [0, 0, 100, 133.2] is written
    # [0, 0, 50, 67] ([0, 0, 100, 134] pixels). The answer [0, 0, 50, 50] has IoU 0.7508 with the exact box
    # (6 of the 10 thresholds) and 0.7463 with the rounded one (5 of 10).
    grid = {
        "solution": "<answer>[{'Position': [0, 0, 50, 67], 'Confidence': 1}]</answer>",
        "category": "cat",
        "row_index": 0,
        "image_size": (2000, 2000),
    }
    answer = [_answer(((0, 0, 50, 50), 0.9))]
    assert DetectionEvaluator()(answer, [grid])["map"] == pytest.approx(0.5)
    exact = grid | {"pixel_boxes": [[0.0, 0.0, 100.0, 133.2]]}
    assert DetectionEvaluator()(answer, [exact])["map"] == pytest.approx(0.6)
    # the columns hold null in records of rows without them: as without the columns
    nulls = grid | {"pixel_boxes": None, "crowd_boxes": None, "not_exhaustive": None}
    assert DetectionEvaluator()(answer, [nulls])["map"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("column", "value"), [("crowd_boxes", [[500.0, 500.0, 900.0, 900.0]]), ("not_exhaustive", True)]
)
def test_detection_stray_box_is_ignored_on_a_crowd_region_or_a_not_exhaustive_category(column, value):
    # The 0.9 box matches nothing: a false positive ranked first (AP 0.5), unless it lies on a crowd region
    # (COCO) or the category is not exhaustively annotated in the image (LVIS): then it is ignored (AP 1).
    row = {
        "solution": "<answer>[{'Position': [0, 0, 100, 100], 'Confidence': 1}]</answer>",
        "category": "cat",
        "row_index": 0,
        "image_size": (1000, 1000),
    }
    answer = [_answer(((600, 600, 700, 700), 0.9), ((0, 0, 100, 100), 0.8))]
    assert DetectionEvaluator()(answer, [row])["map"] == pytest.approx(0.5)
    assert DetectionEvaluator()(answer, [row | {column: value}])["map"] == pytest.approx(1.0)
