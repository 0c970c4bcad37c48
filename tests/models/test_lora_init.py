"""A fresh adapter does not depend on the default device its caller set (strategies differ in that)."""

import torch

from vrft.models.policy import LoraSpec, ModelSpec, attach_lora, load_base_model


def fresh_adapter(default_device: str | None) -> dict[str, torch.Tensor]:
    spec = ModelSpec(name_or_path="tiny")
    base = load_base_model(spec, torch.float32)
    torch.manual_seed(0)
    if default_device is None:
        policy = attach_lora(base, LoraSpec(r=4, alpha=8), gradient_checkpointing=False)
    else:
        # Lightning builds the model under the accelerator's default-device context on one device (CUDA
        # there; meta stands in for it here: any device other than the base's shows the dependence).
        with torch.device(default_device):
            policy = attach_lora(base, LoraSpec(r=4, alpha=8), gradient_checkpointing=False)
    return {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}


def test_the_adapter_is_initialised_on_the_base_device_whatever_the_default_device():
    plain, under_context = fresh_adapter(None), fresh_adapter("meta")
    assert plain.keys() == under_context.keys() and plain
    for name, weight in plain.items():
        assert under_context[name].device.type == "cpu", name
        # The same generator draws the same numbers in the same order: equal bit for bit.
        assert torch.equal(under_context[name], weight), name
