"""`python -m vrft.data.build`: real data to a folder that `data=disk` trains on."""

import datasets
import pytest

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


def test_unknown_category_is_one_line(tmp_path, capsys):
    annotations, images = write_coco(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "detection",
                "--annotations",
                str(annotations),
                "--images",
                str(images),
                "--categories",
                "zebra",
                "--out",
                str(tmp_path / "x"),
            ]
        )
    assert exit_info.value.code == 2
    assert "zebra" in capsys.readouterr().err
