"""`model.name_or_path` at a folder vrft cannot train or evaluate is named when the settings are read."""

from __future__ import annotations

import json

import pytest

from vrft.models.policy import ModelSpec


def test_a_pre_quantised_folder_is_refused_naming_the_unquantised_model(tmp_path):
    # What `vrft.export --int4` writes: bitsandbytes failed inside the first forward of `vrft.evaluate` on it.
    folder = tmp_path / "merged-int4"
    folder.mkdir()
    quantised = {"model_type": "qwen2_vl", "quantization_config": {"quant_method": "bitsandbytes"}}
    (folder / "config.json").write_text(json.dumps(quantised))
    with pytest.raises(
        ValueError, match=r"holds pre-quantised weights \(quantization_config: bitsandbytes\)"
    ):
        ModelSpec(name_or_path=str(folder))
    whole = {
        "model_type": "qwen2_vl",
        "vision_config": {"depth": 1},
        "text_config": {"hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 320},
    }
    (folder / "config.json").write_text(json.dumps(whole))
    assert ModelSpec(name_or_path=str(folder)).folder() == folder  # the bf16 export's config passes


def test_a_missing_folder_is_named_by_the_name_its_caller_gives_it(tmp_path):
    # `vrft.export` names its base `--base`: `model.name_or_path` is a key export does not have
    gone = ModelSpec(name_or_path=str(tmp_path / "gone"))
    with pytest.raises(
        FileNotFoundError, match=r"^model.name_or_path='.*gone' does not exist; set it to a local"
    ):
        gone.folder()
    with pytest.raises(FileNotFoundError, match=r"^--base '.*gone' does not exist; pass --base <folder>$"):
        gone.folder(what=f"--base '{gone.name_or_path}'", fix="pass --base <folder>")
    with pytest.raises(FileNotFoundError, match=r"^--base '.*' has no config.json; pass --base <folder>$"):
        ModelSpec(name_or_path=str(tmp_path)).folder(what=f"--base '{tmp_path}'", fix="pass --base <folder>")
