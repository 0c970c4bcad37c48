"""The model's footprint on the device, as the precision plugin would store it, computed on the meta device.

The model is instantiated on the meta device (no memory, well under a second) and passed through the
precision plugin's own `convert_module`, so the planner counts exactly the layers the plugin quantises.
"""

from __future__ import annotations

import functools
import logging
import re

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vrft.models.policy import VISION_TARGETS, ModelSpec
from vrft.models.presets import PRESETS, model_class, preset_config
from vrft.planner.estimator import ModelShape, WeightFootprint
from vrft.resume import starting_adapter

log = logging.getLogger(__name__)


def model_config(name_or_path: str):
    """The `PretrainedConfig` of a preset or a checkpoint folder (reads config.json only: no weights needed)."""
    if name_or_path in PRESETS:  # tiny and small too: planning does not build their checkpoints
        return preset_config(name_or_path)
    return ModelSpec(name_or_path=name_or_path).config(
        fix=(
            "point model.name_or_path at a Qwen2-VL / Qwen2.5-VL checkpoint folder (its config.json is all "
            f"the plan reads) or a preset: {', '.join(PRESETS)}"
        )
    )


def model_shape(config) -> ModelShape:
    """Sizes the estimator needs, from a Qwen2-VL (`embed_dim`) or Qwen2.5-VL (`hidden_size`) config."""
    text, vision = getattr(config, "text_config", config), config.vision_config
    vision_dim = getattr(vision, "embed_dim", None) or vision.hidden_size
    vision_mlp = getattr(vision, "intermediate_size", None) or int(vision_dim * vision.mlp_ratio)
    return ModelShape(
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads,
        vocab=text.vocab_size,
        vision_dim=vision_dim,
        vision_mlp=vision_mlp,
        vision_depth=vision.depth,
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        spatial_merge=vision.spatial_merge_size,
    )


@functools.lru_cache(maxsize=32)
def _footprint(name_or_path: str, precision_yaml: str, target_modules: str, rank: int) -> tuple[int, ...]:
    precision = instantiate(OmegaConf.create(precision_yaml))
    # The skeleton has no adapters, and QAT changes no storage: convert it as the plain mode.
    if getattr(precision, "qat", False):
        precision.qat = False
    config = model_config(name_or_path)
    with torch.device("meta"):
        model = model_class(config)._from_config(config, dtype=precision.load_dtype)
    model.requires_grad_(False)
    precision.convert_module(model)
    # What the plugin stores itself (packed codes, scales) it reports per layer; the rest is plain tensors.
    storage = {name: precision.layer_storage(module) for name, module in model.named_modules()}
    packed = {id(module.weight) for name, module in model.named_modules() if storage[name]}  # bias: plain
    tensors = [*(p for p in model.parameters() if id(p) not in packed), *model.buffers()]  # buffers: rotary
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    lm_params, largest, adapter, fused_a = 0, 0, 0, 0  # largest: the biggest quantised projection
    int8_layers: set[str] = set()
    target = re.compile(target_modules)
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        count = module.in_features * module.out_features
        if storage[name]:
            layer_bytes, int8_matmuls = storage[name]
            weight_bytes += layer_bytes
            largest = max(largest, count)
            layer = re.search(r"language_model\.layers\.(\d+)\.", name)
            if layer and int8_matmuls:
                int8_layers.add(layer.group(1))
        if ".language_model." in f".{name}" and "lm_head" not in name:
            lm_params += count
        if target.fullmatch(name):
            adapter += rank * (module.in_features + module.out_features)
            if storage[name] and ".language_model." in f".{name}":
                fused_a += rank * module.in_features
    adapter_bytes = torch.empty(0, dtype=precision.adapter_dtype).element_size()
    compute_bytes = torch.empty(0, dtype=precision.compute_dtype).element_size()
    return weight_bytes, lm_params, largest, adapter, fused_a, adapter_bytes, compute_bytes, len(int8_layers)


# Optimizer state per trainable parameter, by class name: (bytes per fp32 parameter, paged).
OPTIMIZER_STATE = {
    "AdamW": (8.0, False),
    "Adam": (8.0, False),
    "AdamW8bit": (2.0 + 8 / 256, False),
    "Adam8bit": (2.0 + 8 / 256, False),
    "PagedAdamW8bit": (2.0 + 8 / 256, True),
    "PagedAdamW": (8.0, True),
    "PagedAdamW32bit": (8.0, True),
    "SGD": (4.0, False),
}


def optimizer_state(optimizer_cfg) -> tuple[float, bool]:
    """Bytes of state per trainable parameter and whether it is paged, from the optimizer's `_target_`."""
    target = str((optimizer_cfg or {}).get("_target_", "torch.optim.AdamW")).rsplit(".", 1)[-1]
    if target not in OPTIMIZER_STATE:
        log.warning("planner: unknown optimizer %s, assuming AdamW's 8 bytes per parameter", target)
    return OPTIMIZER_STATE.get(target, (8.0, False))


def _as_regex(targets: str | list[str] | set[str]) -> str:
    # peft reads a list of names as "the module's name, or its last parts": one full-match regex for both
    if isinstance(targets, str):
        return targets
    return rf"(.*\.)?({'|'.join(re.escape(name) for name in sorted(targets))})"


def weight_footprint(cfg: DictConfig) -> tuple[WeightFootprint, int]:
    """The model's footprint under `cfg.precision` and `cfg.lora`, and the activation element size."""
    precision_yaml = OmegaConf.to_yaml(cfg.precision, resolve=True)
    lora = cfg.lora
    target, rank = str(lora.target_modules), int(lora.r)
    if lora.get("train_vision"):
        target = f"({target})|({VISION_TARGETS})"
    start = starting_adapter(cfg)
    if start is not None:  # a run from an adapter trains that adapter's rank and targets, not the lora node's
        target, rank = _as_regex(start.target_modules), int(start.r)
    weight_bytes, lm_params, largest, adapter, fused_a, adapter_bytes, compute_bytes, int8_layers = (
        _footprint(str(cfg.model.name_or_path), precision_yaml, target, rank)
    )
    state, paged = optimizer_state(cfg.get("optimizer"))
    footprint = WeightFootprint(
        weight_bytes=weight_bytes,
        lm_linear_params=lm_params,
        dequant_params=largest,
        adapter_params=adapter,
        fused_lora_a_params=fused_a,
        adapter_bytes_per_param=adapter_bytes,
        optimizer_bytes_per_param=state * adapter_bytes / 4,  # state follows the parameter dtype
        optimizer_paged=paged,
        int8_layers=int8_layers,
    )
    return footprint, compute_bytes
