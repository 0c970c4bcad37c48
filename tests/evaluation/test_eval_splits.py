"""`python -m vrft.data.build detection-eval`: every (image, category) pair, absent categories included."""

from __future__ import annotations

import json

import pytest

from tests.data.test_builders import write_coco
from vrft.data.build import main
from vrft.data.eval_splits import CATEGORY_SETS, build_detection_eval_rows, category_list
from vrft.data.loading import load_visual_rft


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
