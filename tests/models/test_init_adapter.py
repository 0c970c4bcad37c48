"""A `lora.init_adapter` that is no peft adapter folder is named where the adapter loads, not only by validation:
tests and the Python API call `attach_lora` without validating first, and peft's own error names no setting."""

import pytest
import torch

from vrft.models.policy import LoraSpec, ModelSpec, attach_lora, load_base_model


@pytest.mark.parametrize(
    ("folder", "message"),
    [("gone", "is not a folder; point it at a peft adapter folder"), (".", "has no adapter_config.json")],
)
def test_attach_lora_names_an_init_adapter_that_is_no_adapter_folder(tmp_path, folder, message):
    base = load_base_model(ModelSpec(name_or_path="tiny"), torch.float32)
    path = tmp_path / folder
    with pytest.raises(ValueError, match=f"^lora.init_adapter='{path}' {message}"):
        attach_lora(base, LoraSpec(r=4, alpha=8, init_adapter=str(path)), gradient_checkpointing=False)
