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
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    assert ModelSpec(name_or_path=str(folder)).folder() == folder  # the bf16 export's config passes
