"""`python -m vrft.data.build`: real data to a folder that `data=disk` trains on."""

import json
import re

import datasets
import pytest
from PIL import Image

from tests.data.test_builders import classification_set, write_coco
from vrft.data.build import main
from vrft.data.loading import load_visual_rft


def test_detection_command_writes_a_loadable_folder(tmp_path, capsys):
    annotations, images = write_coco(tmp_path)
    out = tmp_path / "coco_cat"
    main(
        [
            "detection",
            "--annotations",
            str(annotations),
            "--images",
            str(images),
            "--categories",
            "cat",
            "--shots",
            "2",
            "--out",
            str(out),
        ]
    )
    assert f"data.path={out}" in capsys.readouterr().out
    loaded = load_visual_rft(out)
    assert len(loaded["train"]) == 2 and set(loaded["train"]["category"]) == {"cat"}


def test_k_shot_command_keeps_k_per_class(tmp_path):
    source = tmp_path / "flowers"
    datasets.DatasetDict({"train": classification_set({"rose": 4, "tulip": 3})}).save_to_disk(source)
    out = tmp_path / "flowers_1shot"
    main(["k-shot", "--dataset", str(source), "--k", "1", "--out", str(out)])
    assert sorted(load_visual_rft(out)["train"]["solution"]) == [
        "<answer>rose</answer>",
        "<answer>tulip</answer>",
    ]


def test_k_shot_of_a_json_row_without_solution_is_one_line(tmp_path, capsys):
    # a JSON row with "solution": null stopped k-shot with an AttributeError trace from extract_answer
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    solutions = ["<answer>rose</answer>", None, "<answer>tulip</answer>"]
    rows = [{"image": "a.png", "problem": "which flower?", "solution": s} for s in solutions]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    with pytest.raises(SystemExit) as exit_info:
        main(["k-shot", "--dataset", str(tmp_path / "rows.json"), "--k", "1", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "1 row(s) have no solution string (rows 1; row 1 holds None)" in capsys.readouterr().err


def refused_detection_build(tmp_path, capsys, *flags: str) -> str:
    """The error `data.build detection` prints for `flags` on a small COCO set; it must exit 2 (bad input)."""
    annotations, images = write_coco(tmp_path)
    command = ["detection", "--annotations", str(annotations), "--images", str(images), *flags]
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unknown_category_is_one_line(tmp_path, capsys):
    assert "zebra" in refused_detection_build(tmp_path, capsys, "--categories", "zebra")


def test_missing_images_name_the_command_line_switch_that_skips_them(tmp_path, capsys):
    annotations, images = write_coco(tmp_path)
    (images / "000000000002.jpg").unlink()
    command = ["detection", "--annotations", str(annotations), "--images", str(images)]
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "(--on-missing skip)" in capsys.readouterr().err
    main([*command, "--categories", "cat", "--on-missing", "skip", "--out", str(tmp_path / "cat")])
    assert load_visual_rft(tmp_path / "cat")["train"]["image_id"] == [1, 3]


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--shots", "0"], "shots=0 must be at least 1 (images per class); leave it out to keep every image"),
        (["--no-objects", "-1"], "no_objects=-1 must be 0 or more"),
    ],
)
def test_a_count_below_its_minimum_is_named(tmp_path, capsys, flag, message):
    assert message in refused_detection_build(tmp_path, capsys, *flag)


@pytest.mark.parametrize(
    "where", ["the source", "inside the source", "a folder with files", "a file", "under a file"]
)
def test_out_over_an_existing_folder_or_its_own_source_is_refused_before_building(tmp_path, capsys, where):
    # save_to_disk wrote into an existing dataset's folder (mixing their files) or failed on its own source.
    source = tmp_path / "flowers"
    datasets.DatasetDict({"train": classification_set({"rose": 4, "tulip": 3})}).save_to_disk(source)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("kept")
    (tmp_path / "a.txt").write_text("kept")
    out = {
        "the source": source,
        "inside the source": source / "one_shot",
        "a folder with files": tmp_path / "full",
        "a file": tmp_path / "a.txt",
        "under a file": tmp_path / "a.txt" / "one_shot",
    }[where]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()  # the source's save_to_disk bar
    with pytest.raises(SystemExit) as exit_info:
        main(["k-shot", "--dataset", str(source), "--k", "1", "--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    reason = "is inside the input" if "source" in where else "is an existing"
    if where == "a file":
        out, reason = f"'{out.resolve()}'", "is a file"
    if where == "under a file":
        out, reason = f"'{out.resolve()}'", f"is under '{tmp_path.resolve() / 'a.txt'}', which is a file"
    assert error.startswith(f"vrft: error: --out {out} {reason}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    assert len(load_visual_rft(source)["train"]) == 7


def test_out_may_be_an_empty_folder(tmp_path):
    source = tmp_path / "flowers"
    datasets.DatasetDict({"train": classification_set({"rose": 4, "tulip": 3})}).save_to_disk(source)
    (tmp_path / "empty").mkdir()
    main(["k-shot", "--dataset", str(source), "--k", "1", "--out", str(tmp_path / "empty")])
    assert len(load_visual_rft(tmp_path / "empty")["train"]) == 2


@pytest.mark.parametrize(
    ("command", "option"),
    [("detection", "--annotations"), ("detection-eval", "--annotations"), ("grounding", "--json")],
)
@pytest.mark.parametrize(
    ("content", "problem"),
    [(b'{"images": [', "Expecting value"), (b"\x89PNG\r\n", "'utf-8'")],
    ids=["cut short", "not text"],
)
def test_a_json_input_that_does_not_parse_is_named(tmp_path, capsys, command, option, content, problem):
    # json's words alone ("Expecting value: line 1 column 13 (char 12)") named no file
    _, images = write_coco(tmp_path)
    (tmp_path / "cut.json").write_bytes(content)
    source = str(tmp_path / "cut.json")
    with pytest.raises(SystemExit) as exit_info:
        main([command, option, source, "--images", str(images), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"vrft: error: {option} {source} is not valid JSON ({problem}")


def test_max_images_below_one_is_named(tmp_path, capsys):
    # --max-images 0 read "no image ... was found"
    annotations, images = write_coco(tmp_path)
    command = ["detection-eval", "--annotations", str(annotations), "--images", str(images)]
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--categories", "cat", "--max-images", "0", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(
        "vrft: error: max_images=0 must be at least 1 (images sampled); leave it out to keep every image\n"
    )


@pytest.mark.parametrize("command", ["detection", "detection-eval"])
@pytest.mark.parametrize(
    ("place", "field", "value", "words"),
    [
        (
            "annotations",
            "bbox",
            None,
            r"annotations\[0\] \(id 1\) has bbox None, not \[x, y, width, height\]",
        ),
        ("annotations", "bbox", ["1", "2", "3", "4"], r"annotations\[0\] \(id 1\) has bbox \['1'"),
        ("annotations", "category_id", ..., r"annotations\[0\] \(id 1\) has no category_id"),
        ("images", "width", ..., r"images\[0\] \(id 1\) has no width"),
        ("images", "width", 0, r"images\[0\] \(id 1\) has size 0x"),
        ("categories", "name", 5, r"categories\[0\] \(id 1\) has name 5, not a string"),
    ],
)
def test_a_bad_annotation_entry_is_one_line(tmp_path, capsys, command, place, field, value, words):
    # each stopped the build with a KeyError, TypeError or ZeroDivisionError trace from inside the builder
    annotations, images = write_coco(tmp_path)
    coco = json.loads(annotations.read_text())
    entry = coco[place][0]
    if value is ...:
        del entry[field]
    else:
        entry[field] = value
    annotations.write_text(json.dumps(coco))
    flags = ["--annotations", str(annotations), "--images", str(images), "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *flags])
    assert exit_info.value.code == 2
    assert re.search(words, capsys.readouterr().err)


def test_detection_categories_with_spaces_after_commas(tmp_path, capsys):
    # "cat, dog" asked for a category " dog", which the file does not have
    annotations, images = write_coco(tmp_path)
    out = tmp_path / "two"
    command = ["detection", "--annotations", str(annotations), "--images", str(images)]
    main([*command, "--categories", "cat, dog", "--out", str(out)])
    assert set(load_visual_rft(out)["train"]["category"]) == {"cat", "dog"}
