"""A checkpoint folder's config.json that vrft cannot train is named when the planner or the loader reads it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vrft.models.policy import ModelSpec, load_base_model
from vrft.planner.footprint import model_config

TINY_CONFIG = {
    "model_type": "qwen2_vl",
    "vision_config": {"depth": 1, "embed_dim": 32, "num_heads": 2, "hidden_size": 64},
    "text_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 320,
    },
}


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ('{"model_type": "qwen2_vl",', r"has a config.json that cannot be read \(Expecting"),
        (
            '{"model_type": "llama", "hidden_size": 64}',
            r"is a 'llama' checkpoint \(config.json's model_type\)",
        ),
        ('{"hidden_size": 64}', r"is an untyped checkpoint"),
        ('{"model_type": "qwen2_vl", "hidden_size": 64}', r"has a partial config.json \(no vision_config, "),
        (
            '{"model_type": "qwen2_5_vl", "vision_config": {}}',
            r"has a partial config.json \(no hidden_size, num_hidden",
        ),
    ],
)
def test_the_planner_names_a_config_it_cannot_plan_from(tmp_path, config, problem):
    # an OSError (cut JSON) or AttributeError ('LlamaConfig' has no 'vision_config') from transformers, or,
    # for a partial config, a plan of the 2B model's defaults that transformers had filled in
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(
        ValueError, match=rf"^model.name_or_path='{tmp_path}' {problem}.*[:;] point model.name_or_path"
    ):
        model_config(str(tmp_path))


def test_the_planner_reads_a_whole_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    assert model_config(str(tmp_path)).text_config.hidden_size == 64
    assert model_config("qwen25vl-3b").model_type == "qwen2_5_vl"


def test_loading_a_folder_without_weights_names_it(tmp_path):
    # transformers: "Error no file named model.safetensors, or pytorch_model.bin, found in directory"
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(
        ValueError, match=r"has a config.json but no weights \(\*.safetensors or pytorch_model"
    ):
        load_base_model(ModelSpec(name_or_path=str(tmp_path)), torch.float32)
    assert load_base_model(
        ModelSpec(name_or_path=str(tmp_path)), torch.float32, weights=False
    ).config.model_type


def test_an_adapter_folder_as_the_model_names_its_base(tmp_path):
    # "has no config.json; set it to a local Hugging Face checkpoint folder": a run's adapter/final is the
    # folder a user holds after training, and it records the base that belongs in model.name_or_path
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/models/Qwen2-VL-2B"})
    )
    with pytest.raises(FileNotFoundError) as error:
        ModelSpec(name_or_path=str(tmp_path)).folder()
    assert str(error.value) == (
        f"model.name_or_path='{tmp_path}' is a peft adapter (trained on '/models/Qwen2-VL-2B'), not a model; set "
        "it to that base and pass the adapter as lora.init_adapter= (vrft.train) or adapters=[...] (vrft.evaluate)"
    )


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ('{"model_type": "qwen2_vl",', "has a config.json that cannot be read (Expecting"),
        ('{"model_type": "llama", "hidden_size": 64}', "is a 'llama' checkpoint (config.json's model_type)"),
    ],
)
def test_plan_names_the_folder_in_one_line_before_any_model_is_built(tmp_path, config, problem):
    # the settings check builds the model on the meta device: an OSError or an AttributeError traceback from
    # transformers ("'LlamaConfig' object has no attribute 'vision_config'"), exit 1
    (tmp_path / "config.json").write_text(config)
    result = subprocess.run(
        [sys.executable, "-m", "vrft.plan", "model=local", f"model.name_or_path={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"vrft: error: model.name_or_path='{tmp_path}' {problem}"), result.stderr
    assert "Traceback" not in result.stderr
