"""Does an adapter folder fit the base model? Checked from shapes alone, before any weight is loaded.

peft reports a mismatched adapter as a `size mismatch` traceback from deep inside `load_state_dict`, after
the base model has loaded (minutes for 7B). Here the adapter's tensor shapes (read from the safetensors
header, no tensor data) are compared with the projections of the base model built on the meta device (no
memory), so a wrong pairing is one line before anything is decoded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vrft.models.policy import ModelSpec, is_adapter_folder
from vrft.models.presets import PRESETS, model_class, preset_config

_PREFIX = "base_model.model."


def meta_model(spec: ModelSpec) -> torch.nn.Module:
    """`spec`'s model built on the meta device: its module names and shapes without weights (0.05 s for 7B)."""
    # Every preset's config is at hand: `spec.config()` would build the tiny or small checkpoint on disk first.
    is_preset = spec.name_or_path in PRESETS
    config = preset_config(spec.name_or_path) if is_preset else spec.config()
    with torch.device("meta"):
        return model_class(config)._from_config(config)


def adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """`{tensor name: shape}` of the adapter weights in `folder` (adapter_model.safetensors)."""
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(
            f"adapter '{folder}' has no adapter_model.safetensors; point adapters= at a peft adapter folder "
            "such as <run_dir>/adapter/final"
        )
    try:
        with safe_open(str(weights), framework="pt") as file:
            return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}  # noqa: SIM118
    except SafetensorError as error:  # a file copied in part: safetensors' words name no file
        raise ValueError(
            f"adapter weights '{weights}' could not be read ({error}); the file was probably copied or written in "
            "part: copy the adapter folder again"
        ) from None


def check_adapter(adapter: str | Path, spec: ModelSpec) -> None:
    """Raise `ValueError` naming the adapter and the model when the adapter's LoRA shapes do not fit it."""
    folder = Path(adapter).expanduser()
    config_file = folder / "adapter_config.json"
    if not is_adapter_folder(folder):
        raise FileNotFoundError(
            f"adapter '{adapter}' has no adapter_config.json; point adapters= at a peft adapter folder such as "
            "<run_dir>/adapter/final"
        )
    try:
        trained_on = json.loads(config_file.read_text()).get("base_model_name_or_path") or "unknown"
    except (json.JSONDecodeError, AttributeError) as error:  # cut short, or not a JSON object
        raise ValueError(
            f"adapter config '{config_file}' is not a peft adapter config ({error}); the file was probably copied "
            "or written in part: copy the adapter folder again"
        ) from None
    problem = shape_mismatch(folder, spec)
    if problem is not None:
        raise ValueError(
            f"adapter '{adapter}' (trained on '{trained_on}') does not fit model.name_or_path="
            f"'{spec.name_or_path}': {problem}; evaluate it with the model it was trained on"
        )


def shape_mismatch(folder: Path, spec: ModelSpec, unknown_modules: bool = False) -> str | None:
    """How the LoRA shapes of the adapter in `folder` first fail to fit `spec`'s model (built on the meta
    device), in words; None where they fit. `unknown_modules`: a module the model lacks is passed over (a name of
    another transformers version, which peft maps when it loads) instead of being the mismatch."""
    modules = dict(meta_model(spec).named_modules())
    for name, shape in adapter_shapes(folder).items():
        problem = _mismatch(name.removeprefix(_PREFIX), shape, modules, unknown_modules)
        if problem is not None:
            return problem
    return None


def _mismatch(name: str, shape: tuple[int, ...], modules: dict, unknown_modules: bool) -> str | None:
    for part, axis, feature in ((".lora_A.", 1, "in_features"), (".lora_B.", 0, "out_features")):
        if part not in name:
            continue
        module_name = name.split(part)[0]
        module = modules.get(module_name)
        if module is None:
            return None if unknown_modules else f"the model has no module '{module_name}'"
        expected = getattr(module, feature, None)
        if expected is not None and shape[axis] != expected:
            return (
                f"'{module_name}' has {feature}={expected}, the adapter's {part.strip('.')} has {shape[axis]}"
            )
    return None
