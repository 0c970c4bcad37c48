"""Builders for real data: COCO/LVIS detection rows, k-shot subsets, LISA grounding rows, the prompts."""

from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image

from vrft.data.detection_rows import build_detection_rows
from vrft.data.grounding_rows import build_grounding_rows
from vrft.data.k_shot import subsample_k_shot
from vrft.data.prompts import classification_prompt, detection_prompt
from vrft.rewards import check_detection_solution, check_grounding_solution, iou_reward

SIZES = {1: (200, 100), 2: (100, 100), 3: (50, 80), 4: (64, 64)}


def write_coco(tmp_path, images=SIZES, lvis=False, annotations=None):
    """Tiny COCO file: cats in images 1-3, a dog in image 1 (plus a crowd dog in 2), nothing in 4."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    entries = []
    for image_id, (width, height) in images.items():
        name = f"{image_id:012d}.jpg"
        Image.new("RGB", (width, height), (image_id * 40, 0, 0)).save(image_dir / name)
        entry = {"id": image_id, "width": width, "height": height}
        entry |= (
            {"coco_url": f"http://images.cocodataset.org/val2017/{name}"} if lvis else {"file_name": name}
        )
        if lvis:
            entry["neg_category_ids"] = [2] if image_id == 4 else []
        entries.append(entry)
    annotations = annotations or [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 10, 40, 30]},  # grid [100, 100, 300, 400]
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 50, 50, 50]},
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10]},
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50]},
        {"id": 5, "image_id": 2, "category_id": 2, "bbox": [0, 0, 100, 100], "iscrowd": 1},
        {"id": 6, "image_id": 3, "category_id": 1, "bbox": [5, 8, 10, 16]},
    ]
    coco = {
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return path, image_dir


def test_detection_rows_from_coco(tmp_path):
    path, image_dir = write_coco(tmp_path)
    rows = build_detection_rows(path, image_dir, categories=["cat", "dog"])["train"]
    assert rows.column_names == [
        "image",
        "problem",
        "solution",
        "category",
        "image_id",
        "width",
        "height",
        "pixel_boxes",
        "crowd_boxes",
        "not_exhaustive",
    ]
    assert [(r["category"], r["image_id"]) for r in rows.remove_columns("image")] == [
        ("cat", 1),
        ("cat", 2),
        ("cat", 3),
        ("dog", 1),  # the crowd dog in image 2 is left out
    ]
    first = rows[0]
    # 200 x 100 image: xywh [20, 10, 40, 30] -> xyxy [20, 10, 60, 40] -> grid [100, 100, 300, 400].
    assert first["solution"] == (
        "<answer>[{'Position': [100, 100, 300, 400], 'Confidence': 1}, "
        "{'Position': [500, 500, 750, 1000], 'Confidence': 1}]</answer>"
    )
    assert first["problem"] == detection_prompt("cat")
    assert first["image"].size == (200, 100) and (first["width"], first["height"]) == (200, 100)
    # the file's boxes as xyxy pixels, unrounded, for the official evaluation; no crowd region, exhaustive
    assert first["pixel_boxes"] == [[20.0, 10.0, 60.0, 40.0], [100.0, 50.0, 150.0, 100.0]]
    assert (first["crowd_boxes"], first["not_exhaustive"]) == ([], False)
    for solution in rows["solution"]:
        check_detection_solution(solution)
        assert iou_reward([solution], [solution]) == [1.0]


def test_detection_rows_in_absolute_pixels(tmp_path):
    path, image_dir = write_coco(tmp_path)
    rows = build_detection_rows(path, image_dir, categories=["cat"], coord_convention="absolute")["train"]
    assert "[20, 10, 60, 40]" in rows[0]["solution"]
    assert "in pixels, integer" in rows[0]["problem"]


def test_k_shot_sampling_is_seeded_and_nested(tmp_path):
    path, image_dir = write_coco(tmp_path)

    def image_ids(shots, seed):
        return build_detection_rows(path, image_dir, categories=["cat"], shots=shots, seed=seed)["train"][
            "image_id"
        ]

    assert image_ids(2, 0) == image_ids(2, 0)
    assert len(image_ids(2, 0)) == 2
    assert set(image_ids(1, 0)) <= set(image_ids(2, 0))
    assert {tuple(image_ids(1, seed)) for seed in range(30)} == {(1,), (2,), (3,)}  # every image can be drawn


def test_no_objects_rows(tmp_path):
    path, image_dir = write_coco(tmp_path)
    rows = build_detection_rows(path, image_dir, categories=["dog"], no_objects=2)["train"]
    solutions = dict(zip(rows["image_id"], rows["solution"], strict=True))
    assert solutions[1].startswith("<answer>[{'Position'")
    assert [image for image, s in solutions.items() if s == "<answer>No Objects</answer>"] != []
    assert len(rows) == 3
    # image 2's crowd of dogs is no "No Objects" image: only 3 and 4 are
    assert {image for image, s in solutions.items() if s == "<answer>No Objects</answer>"} == {3, 4}
    with pytest.raises(ValueError, match="absent from only 2 images, fewer than no_objects=3"):
        build_detection_rows(path, image_dir, categories=["dog"], no_objects=3)


def test_lvis_file_names_and_verified_negatives(tmp_path):
    path, image_dir = write_coco(tmp_path, lvis=True)
    rows = build_detection_rows(path, image_dir, categories=["dog"], no_objects=1)["train"]
    # Only image 4 lists "dog" as a verified negative.
    assert list(zip(rows["image_id"], rows["solution"], strict=True))[-1] == (
        4,
        "<answer>No Objects</answer>",
    )
    with pytest.raises(ValueError, match="lower no_objects to 1"):
        build_detection_rows(path, image_dir, categories=["dog"], no_objects=2)


def test_detection_errors_name_the_value_and_fix(tmp_path):
    path, image_dir = write_coco(tmp_path)
    with pytest.raises(ValueError, match=r"\['horse'\] are not in .*available: bird, cat, dog"):
        build_detection_rows(path, image_dir, categories=["cat", "horse"])
    with pytest.raises(
        ValueError, match="'cat' has 3 images with boxes, fewer than shots=4; lower shots to 3"
    ):
        build_detection_rows(path, image_dir, categories=["cat"], shots=4)
    with pytest.raises(ValueError, match="no detection rows"):
        build_detection_rows(path, image_dir, categories=["bird"])
    with pytest.raises(ValueError, match="on_missing"):
        build_detection_rows(path, image_dir, on_missing="ignore")
    with pytest.raises(ValueError, match="coord_convention"):
        build_detection_rows(path, image_dir, coord_convention="xywh")


def test_missing_images_error_or_skip(tmp_path):
    path, image_dir = write_coco(tmp_path)
    (image_dir / "000000000002.jpg").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"1 of 3 images .* missing, e\.g\. '.*000000000002\.jpg'.*on_missing='skip'"
    ):
        build_detection_rows(path, image_dir, categories=["cat", "dog"])
    rows = build_detection_rows(path, image_dir, categories=["cat"], on_missing="skip")["train"]
    assert rows["image_id"] == [1, 3]


def classification_set(counts):
    solutions = [f"<answer>{label}</answer>" for label, count in counts.items() for _ in range(count)]
    images = [Image.new("RGB", (4, 4))] * len(solutions)
    return datasets.Dataset.from_dict(
        {"image": images, "problem": [classification_prompt()] * len(solutions), "solution": solutions},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "problem": datasets.Value("string"),
                "solution": datasets.Value("string"),
            }
        ),
    )


def test_subsample_k_shot_counts_seed_and_nesting():
    dataset = classification_set({"daisy": 6, "rose": 5, "tulip": 4})
    four = subsample_k_shot(dataset, 4, seed=1)
    labels = [s.removeprefix("<answer>").removesuffix("</answer>") for s in four["solution"]]
    assert {label: labels.count(label) for label in labels} == {"daisy": 4, "rose": 4, "tulip": 4}
    assert four["solution"] == subsample_k_shot(dataset, 4, seed=1)["solution"]
    one, two = (
        subsample_k_shot(dataset.add_column("index", list(range(15))), k, seed=1)["index"] for k in (1, 2)
    )
    assert set(one) <= set(two)
    assert one == sorted(one)  # original order kept
    is_tulip = subsample_k_shot(dataset, 4, label_fn=lambda solution: str("tulip" in solution))
    assert len(is_tulip) == 8 and is_tulip["solution"].count("<answer>tulip</answer>") == 4


def test_subsample_k_shot_errors():
    dataset = classification_set({"daisy": 4, "rose": 2, "tulip": 1})
    with pytest.raises(
        ValueError, match=r"2 class\(es\) have fewer than k=3 rows: 'rose' \(2\), 'tulip' \(1\); lower k to 1"
    ):
        subsample_k_shot(dataset, 3)
    with pytest.raises(ValueError, match="at least 1"):
        subsample_k_shot(dataset, 0)
    with pytest.raises(TypeError, match=r"dataset\['train'\]"):
        subsample_k_shot(datasets.DatasetDict({"train": dataset}), 1)


def write_lisa(tmp_path, entries):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    Image.new("RGB", (200, 100)).save(tmp_path / "imgs" / "a.jpg")
    path = tmp_path / "lisa.json"
    path.write_text(json.dumps(entries))
    return path


def test_grounding_rows(tmp_path):
    path = write_lisa(
        tmp_path, [{"image": "imgs/a.jpg", "instruction": "the thing to sit on", "box": [20, 10, 60, 40]}]
    )
    row = build_grounding_rows(path)["train"][0]
    assert row["solution"] == "<answer>(100,100),(300,400)</answer>"
    assert "the thing to sit on" in row["problem"] and row["problem"].endswith("format.")
    assert (row["width"], row["height"]) == (200, 100)
    check_grounding_solution(row["solution"])
    absolute = build_grounding_rows(path, coord_convention="absolute")["train"][0]
    assert absolute["solution"] == "<answer>(20,10),(60,40)</answer>"
    # A box overshooting the border by rounding is clamped onto the image.
    path = write_lisa(tmp_path, [{"image": "imgs/a.jpg", "instruction": "x", "box": [-1, 0, 201, 100]}])
    assert (
        build_grounding_rows(path, coord_convention="absolute")["train"][0]["solution"]
        == "<answer>(0,0),(200,100)</answer>"
    )


def test_grounding_errors(tmp_path):
    good = {"image": "imgs/a.jpg", "instruction": "x", "box": [20, 10, 60, 40]}
    with pytest.raises(ValueError, match=r"entries \[1\] .* lack image, instruction or box"):
        build_grounding_rows(write_lisa(tmp_path, [good, {"image": "imgs/a.jpg", "box": [1, 2, 3, 4]}]))
    with pytest.raises(ValueError, match=r"entry 0 .* box \[1, 2, 3\] is not \[x1, y1, x2, y2\]"):
        build_grounding_rows(write_lisa(tmp_path, [good | {"box": [1, 2, 3]}]))
    with pytest.raises(ValueError, match="no area inside the 200x100 image"):
        build_grounding_rows(write_lisa(tmp_path, [good | {"box": [300, 10, 400, 40]}]))
    path = write_lisa(tmp_path, [good, good | {"image": "imgs/missing.jpg"}])
    with pytest.raises(FileNotFoundError, match=r"1 of 2 images .* missing, e\.g\. '.*imgs/missing\.jpg'"):
        build_grounding_rows(path)
    assert len(build_grounding_rows(path, on_missing="skip")["train"]) == 1


@pytest.mark.parametrize(("key", "value"), [("image", None), ("instruction", 5), ("instruction", "  ")])
def test_grounding_entry_without_a_usable_image_or_instruction_is_named(tmp_path, key, value):
    # an image of null stopped the build with a TypeError from the path join, an instruction of 5 went into the prompt
    good = {"image": "imgs/a.jpg", "instruction": "x", "box": [20, 10, 60, 40]}
    with pytest.raises(
        ValueError, match=rf"entries \[1\] .* not a non-empty string \(entry 1: {key} {value!r}\)"
    ):
        build_grounding_rows(write_lisa(tmp_path, [good, good | {key: value}]))


def test_an_underscore_spells_a_space_in_a_category_name(tmp_path):
    path, image_dir = write_coco(tmp_path)
    coco = json.loads(path.read_text())
    coco["categories"][1]["name"] = "hot dog"  # as COCO's "fire hydrant"
    path.write_text(json.dumps(coco))
    rows = build_detection_rows(path, image_dir, categories=["hot_dog"])["train"]
    assert set(rows["category"]) == {"hot dog"} and "category 'hot dog'" in rows["problem"][0]
