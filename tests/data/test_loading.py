"""Visual-RFT data as users have it: save_to_disk folders, Hub parquet layouts, JSON with image paths."""

import io
import json

import datasets
import pyarrow
import pyarrow.parquet
import pytest
from PIL import Image

from vrft.data.datamodule import VisualRFTDataModule
from vrft.data.loading import check_problem, decode_image, load_visual_rft
from vrft.rewards import check_classification_solution

FEATURES = datasets.Features(
    {"image": datasets.Image(), "problem": datasets.Value("string"), "solution": datasets.Value("string")}
)


def make_rows(count=4):
    colours = [(255, 0, 0), (0, 0, 255)]
    return {
        "image": [Image.new("RGB", (32, 24), colours[i % 2]) for i in range(count)],
        "problem": [f"question {i}" for i in range(count)],
        "solution": [f"<answer>{'red' if i % 2 == 0 else 'blue'}</answer>" for i in range(count)],
    }


@pytest.fixture
def saved(tmp_path):
    dataset = datasets.DatasetDict({"train": datasets.Dataset.from_dict(make_rows(), features=FEATURES)})
    dataset.save_to_disk(tmp_path / "saved")
    return tmp_path / "saved", dataset


def test_save_to_disk_folder(saved):
    path, _ = saved
    loaded = load_visual_rft(path)
    assert list(loaded) == ["train"] and len(loaded["train"]) == 4
    assert decode_image(loaded["train"][0]["image"]).size == (32, 24)


def test_hub_parquet_layout_loads_like_save_to_disk(saved, tmp_path):
    _, dataset = saved
    (tmp_path / "hub" / "data").mkdir(parents=True)
    dataset["train"].to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    dataset["train"].select(range(2)).to_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    loaded = load_visual_rft(tmp_path / "hub")
    assert sorted(loaded) == ["test", "train"]
    assert len(loaded["train"]) == 4 and len(loaded["test"]) == 2
    assert decode_image(loaded["train"][1]["image"]).getpixel((0, 0)) == (0, 0, 255)
    assert loaded["train"][1]["solution"] == "<answer>blue</answer>"


@pytest.mark.parametrize(
    ("train_file", "test_file"),
    [
        # older push_to_hub appended the shard's fingerprint: both splits were read as one split "train"
        ("data/train-00000-of-00001-6f3e1b8a2c1d.parquet", "data/test-00000-of-00001-0a9b8c7d6e5f.parquet"),
        # the Hub's refs/convert/parquet layout: both files were read as one split "0000"
        ("default/train/0000.parquet", "default/test/0000.parquet"),
    ],
)
def test_hub_parquet_split_names(saved, tmp_path, train_file, test_file):
    _, dataset = saved
    for name, rows in ((train_file, 4), (test_file, 2)):
        (tmp_path / "hub" / name).parent.mkdir(parents=True, exist_ok=True)
        dataset["train"].select(range(rows)).to_parquet(tmp_path / "hub" / name)
    loaded = load_visual_rft(tmp_path / "hub")
    assert sorted(loaded) == ["test", "train"]
    assert len(loaded["train"]) == 4 and len(loaded["test"]) == 2
    train_folder = (tmp_path / "hub" / train_file).parent
    if train_folder.name == "train":  # a split's own folder gives that one split: it was split "0000"
        assert list(load_visual_rft(train_folder)) == ["train"]


def test_parquet_with_encoded_image_bytes(tmp_path):
    # pandas or pyarrow write images as a plain binary column: each row was refused as "not a path"
    encoded = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(encoded, "PNG")
    table = pyarrow.table(
        {"image": [encoded.getvalue()], "problem": ["which colour?"], "solution": ["<answer>red</answer>"]}
    )
    pyarrow.parquet.write_table(table, tmp_path / "rows.parquet")
    loaded = load_visual_rft(tmp_path / "rows.parquet")["train"]
    assert decode_image(loaded[0]["image"]).getpixel((1, 1)) == (200, 0, 0)


def test_jsonl_with_relative_image_paths(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (10, 10), (0, 255, 0)).save(tmp_path / "images" / "a.png")
    rows = [{"image": "images/a.png", "problem": "what?", "solution": "<answer>green</answer>"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    loaded = load_visual_rft(tmp_path / "data.jsonl")
    assert decode_image(loaded["train"][0]["image"]).getpixel((5, 5)) == (0, 255, 0)


def test_json_image_objects_resolve_beside_the_file(tmp_path, monkeypatch):
    # {"path": ...}, the datasets Image feature's form, was read from the working folder, not the file's
    (tmp_path / "data" / "images").mkdir(parents=True)
    Image.new("RGB", (10, 10), (0, 255, 0)).save(tmp_path / "data" / "images" / "a.png")
    Image.new("RGB", (10, 10), (0, 0, 255)).save(tmp_path / "b.png")
    images = [{"bytes": None, "path": "images/a.png"}, {"bytes": None, "path": str(tmp_path / "b.png")}]
    rows = [{"image": image, "problem": "what?", "solution": "<answer>x</answer>"} for image in images]
    (tmp_path / "data" / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_visual_rft(tmp_path / "data" / "rows.json")["train"]
    assert [decode_image(row["image"]).getpixel((5, 5)) for row in loaded] == [(0, 255, 0), (0, 0, 255)]


def test_missing_columns_are_named(tmp_path):
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"image": ["x"], "question": ["q"]})}
    ).save_to_disk(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['problem', 'solution'\]"):
        load_visual_rft(tmp_path / "bad")


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path='.*nowhere' does not exist"):
        load_visual_rft(tmp_path / "nowhere")


def write_with_bad_rows(tmp_path):
    rows = make_rows(4)
    dataset = datasets.Dataset.from_dict(rows, features=FEATURES).cast_column(
        "image", datasets.Image(decode=False)
    )
    table = dataset.to_dict()
    table["image"][1] = {"bytes": b"not an image", "path": "broken.jpg"}
    table["solution"][2] = "red"  # no <answer> tags
    bad = datasets.Dataset.from_dict(table, features=dataset.features)
    datasets.DatasetDict({"train": bad}).save_to_disk(tmp_path / "bad_rows")
    return tmp_path / "bad_rows"


def test_bad_rows_stop_before_training_with_the_fix(tmp_path):
    module = VisualRFTDataModule(
        path=str(write_with_bad_rows(tmp_path)), check_solution=check_classification_solution
    )
    with pytest.raises(ValueError) as error:
        module.setup("fit")
    message = str(error.value)
    assert "2 bad row(s)" in message and "row 1: image 'broken.jpg' could not be decoded" in message
    assert "row 2:" in message and "data.on_bad_row=skip" in message


def test_oversized_ground_truth_is_named_by_row(tmp_path):
    dataset = datasets.Dataset.from_dict(make_rows(3), features=FEATURES)
    table = dataset.to_dict()
    table["solution"][1] = f"<answer>red{' ' * 100_000}</answer>"
    path = tmp_path / "oversized"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(table, features=dataset.features)}
    ).save_to_disk(path)
    module = VisualRFTDataModule(path=str(path), check_solution=check_classification_solution)
    with pytest.raises(
        ValueError, match=r"1 bad row\(s\) in split 'train': row 1: solution has 100,020 characters"
    ):
        module.setup("fit")


def test_bad_rows_skipped_and_counted(tmp_path):
    module = VisualRFTDataModule(
        path=str(write_with_bad_rows(tmp_path)),
        check_solution=check_classification_solution,
        on_bad_row="skip",
        batch_size=1,
    )
    module.setup("fit")
    assert module.skipped_rows == {"train": 2}
    batch = next(iter(module.train_dataloader()))
    assert isinstance(batch, list) and isinstance(batch[0]["image"], Image.Image)
    assert len(module.splits["train"]) == 2


def test_bad_validation_images_are_found_at_setup(tmp_path):
    # only the training split's images were decoded at setup: a bad validation image stopped the run at the
    # first validation, after training steps, even with on_bad_row=skip
    bad = load_visual_rft(write_with_bad_rows(tmp_path))["train"]
    good = datasets.Dataset.from_dict(make_rows(4), features=FEATURES)
    datasets.DatasetDict({"train": good, "test": bad}).save_to_disk(tmp_path / "with_val")
    settings = {"path": str(tmp_path / "with_val"), "val_split": "test", "batch_size": 1}
    with pytest.raises(ValueError, match=r"bad row\(s\) in split 'test'.*row 1: image 'broken.jpg'"):
        VisualRFTDataModule(**settings).setup("fit")
    module = VisualRFTDataModule(**settings, on_bad_row="skip")
    module.setup("fit")
    assert module.skipped_rows["test"] == 1 and len(module.splits["val"]) == 3


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "it holds no rows"),
        ("[]", "it holds no rows"),
        ('{"image": "a.png", "problem": \n', "JSON parse error"),
    ],
)
def test_unreadable_json_is_named_with_the_fix(tmp_path, content, problem):
    (tmp_path / "data.jsonl").write_text(content)
    with pytest.raises(
        ValueError, match=rf"data.path='.*data.jsonl' could not be read as JSON/JSONL \({problem}"
    ):
        load_visual_rft(tmp_path / "data.jsonl")


def test_json_without_an_image_column_names_the_column(tmp_path):
    (tmp_path / "data.json").write_text(
        json.dumps([{"problem": "what?", "solution": "<answer>red</answer>"}])
    )
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['image'\]"):
        load_visual_rft(tmp_path / "data.json")


def test_json_rows_missing_image_or_problem_are_named_by_row(tmp_path):
    Image.new("RGB", (10, 10), (255, 0, 0)).save(tmp_path / "a.png")
    row = {"image": "a.png", "problem": "what?", "solution": "<answer>red</answer>"}
    rows = [
        row,
        {k: v for k, v in row.items() if k != "image"},
        {k: v for k, v in row.items() if k != "problem"},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    module = VisualRFTDataModule(
        path=str(tmp_path / "data.jsonl"), check_solution=check_classification_solution
    )
    with pytest.raises(ValueError) as error:
        module.setup("fit")
    message = str(error.value)
    assert "2 bad row(s)" in message and "row 1: the row has no image" in message
    assert "row 2: problem None is empty" in message


def test_a_saved_split_without_rows_is_named_with_the_fix(tmp_path):
    # datasets saves an empty split but cannot load it back: IndexError from concatenating no arrow files
    empty = datasets.Dataset.from_dict(make_rows(0), features=FEATURES)
    full = datasets.Dataset.from_dict(make_rows(), features=FEATURES)
    datasets.DatasetDict({"train": full, "test": empty}).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError) as error:
        load_visual_rft(tmp_path / "saved")
    assert str(error.value) == (
        f"data.path='{tmp_path / 'saved'}' has split(s) ['test'] with no rows, which datasets cannot load back; "
        "drop the split before save_to_disk (del dataset[split]) or give it rows"
    )
    empty.save_to_disk(tmp_path / "one")  # a single Dataset reads as split train
    with pytest.raises(ValueError, match=r"data.path='.*one' has split\(s\) \['train'\] with no rows"):
        load_visual_rft(tmp_path / "one")


@pytest.mark.parametrize("cut", ["dataset_dict.json", "train/state.json", "train/data-00000-of-00001.arrow"])
def test_a_save_to_disk_folder_cut_short_is_named(saved, cut):
    # a copy or a write stopped part way: datasets' words named a place in a file, not the folder
    path, _ = saved
    file = path / cut
    file.write_bytes(file.read_bytes()[:10])
    with pytest.raises(
        ValueError, match=rf"data.path='{path}' is a save_to_disk folder that could not be read \("
    ):
        load_visual_rft(path)


def test_json_rows_whose_image_is_not_one_path_are_bad_rows(tmp_path):
    # a list (multi-image files) or a number stopped the load with pathlib's TypeError, whatever on_bad_row said
    Image.new("RGB", (10, 10), (255, 0, 0)).save(tmp_path / "a.png")
    row = {"image": "a.png", "problem": "what?", "solution": "<answer>red</answer>"}
    rows = [row, {**row, "image": ["a.png"]}, {**row, "image": 3}, row]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    path = str(tmp_path / "data.jsonl")
    module = VisualRFTDataModule(path=path, check_solution=check_classification_solution)
    with pytest.raises(ValueError) as error:
        module.setup("fit")
    message = str(error.value)
    assert "2 bad row(s)" in message
    assert "row 1: image ['a.png'] is not a path; image must be one path string" in message
    assert "row 2: image 3 is not a path" in message
    module = VisualRFTDataModule(
        path=path, check_solution=check_classification_solution, on_bad_row="skip", batch_size=1
    )
    module.setup("fit")
    assert module.skipped_rows == {"train": 2}
    assert next(iter(module.train_dataloader()))[0]["image"].getpixel((5, 5)) == (255, 0, 0)
    (tmp_path / "lists.jsonl").write_text(json.dumps({**row, "image": ["a.png", "a.png"]}))
    with pytest.raises(
        ValueError, match=r"every row of split 'train' is bad; first problem: image \['a.png'"
    ):
        VisualRFTDataModule(path=str(tmp_path / "lists.jsonl"), on_bad_row="skip", batch_size=1).setup("fit")
    # only numbers: an int64 column, which datasets cannot cast to an image column (pyarrow's traceback)
    (tmp_path / "numbers.jsonl").write_text(json.dumps({**row, "image": 5}))
    with pytest.raises(
        ValueError, match=r"every row of split 'train' is bad; first problem: image 5 is not a"
    ):
        VisualRFTDataModule(path=str(tmp_path / "numbers.jsonl"), on_bad_row="skip", batch_size=1).setup(
            "fit"
        )


def test_a_problem_that_is_not_a_string_is_named_as_such(tmp_path):
    # a list read "problem ['a', 'b'] is empty"
    with pytest.raises(
        ValueError, match=r"^problem \['a', 'b'\] is not a string; give every row the question"
    ):
        check_problem(["a", "b"])
    with pytest.raises(ValueError, match=r"^problem None is empty"):
        check_problem(None)
    with pytest.raises(ValueError, match=r"^problem ' ' is empty"):
        check_problem(" ")


def test_an_image_the_processor_refuses_for_its_aspect_ratio_is_a_bad_row(tmp_path):
    # Measured: Qwen2-VL's processor raised "absolute aspect ratio must be smaller than 200, got 300.0" for a
    # 1x300 image at the first rollout that drew the row, after setup had passed it.
    table = make_rows(3)
    table["image"][1] = Image.new("RGB", (300, 1))
    path = tmp_path / "thin"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table, features=FEATURES)}).save_to_disk(path)
    module = VisualRFTDataModule(path=str(path), check_solution=check_classification_solution)
    with pytest.raises(
        ValueError, match=r"row 1: image .* is 300x1 pixels, a side more than 200 times the other"
    ):
        module.setup("fit")
    # 200x1 is the processor's limit, still accepted
    assert decode_image(Image.new("RGB", (200, 1))).size == (200, 1)
    with pytest.raises(ValueError, match=r"the row's image is 1x201 pixels.*data.on_bad_row=skip"):
        decode_image(Image.new("RGB", (1, 201)))
