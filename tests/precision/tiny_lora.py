"""The tiny Qwen2-VL with a peft LoRA adapter, as the precision tests build it."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText

from vrft.models.presets import model_class, preset_config, tiny_checkpoint
from vrft.precision import VrftPrecision

TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LM_LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
VISION_LINEARS = 10  # 2 blocks x (qkv, proj, fc1, fc2) + merger mlp.0, mlp.2
MERGER_LINEARS = 2


def base_model(dtype: torch.dtype = torch.float32, num_layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """The frozen tiny preset (2 decoder layers, real checkpoint) or a random one with `num_layers`."""
    if num_layers == 2:
        base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint(), dtype=dtype)
    else:
        config = preset_config("tiny")
        config.text_config.num_hidden_layers = num_layers
        config.text_config.layer_types = ["full_attention"] * num_layers
        torch.manual_seed(seed)
        base = model_class(config)._from_config(config, dtype=dtype)
    return base.requires_grad_(False)


def lora_model(
    dtype: torch.dtype = torch.float32, num_layers: int = 2, seed: int = 0, dropout: float = 0.0
) -> PeftModel:
    """`base_model` with a LoRA adapter (r=8, alpha=16) on every language-model projection."""
    base = base_model(dtype, num_layers, seed)
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGET_MODULES)
    return get_peft_model(base, config)


def converted(plugin: VrftPrecision, num_layers: int = 2, device: str = "cpu") -> PeftModel:
    """What Lightning does: load in the plugin's dtype, attach LoRA, `convert_module` on CPU, move."""
    model = plugin.convert_module(lora_model(plugin.load_dtype, num_layers))
    model = model.to(device)  # bitsandbytes quantises here, also on CPU
    plugin.device_type = torch.device(device).type
    return model


def token_batch(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    """`[batch, length]` token ids from the ordinary part of the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, 5000, (batch, length), generator=generator)


def randomize_adapters(model: torch.nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """Give lora_B non-zero values (peft starts it at zero), so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the adapter weights by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """`||value - reference|| / ||reference||` in fp32."""
    value, reference = value.float(), reference.float()
    return float((value - reference).norm() / reference.norm())
