"""Which linear layers a quantised mode converts, and which it keeps in the compute dtype.

Keep entries are dotted module paths matched as whole segments anywhere in a module's name, with `*`
standing for one segment: `visual.merger` matches `policy.base_model.model.model.visual.merger.mlp.0`,
`layers.1` matches `...language_model.layers.1.mlp.up_proj` but not `...layers.10...`, and
`layers.*.mlp.down_proj` matches every decoder layer's down projection. Names therefore work with or
without the peft and Lightning prefixes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from vrft.precision.accounting import bitsandbytes_class

DECODER_LAYER = re.compile(r"(?:^|\.)language_model\.layers\.(\d+)$")


def path_pattern(path: str) -> re.Pattern:
    """A regex matching module names that contain the dotted `path` as whole segments (`*`: one segment)."""
    segments = [r"[^.]+" if segment == "*" else re.escape(segment) for segment in path.split(".")]
    return re.compile(r"(?:^|\.)" + r"\.".join(segments) + r"(?:\.|$)")


def is_lora_layer(name: str) -> bool:
    """Whether `name` is inside a LoRA adapter (`lora_A`, `lora_B`, ...)."""
    return any(segment.startswith("lora_") for segment in name.split("."))


def is_adapter(name: str, module: torch.nn.Module) -> bool:
    """LoRA adapter layers and anything trainable: never quantised."""
    return is_lora_layer(name) or any(p.requires_grad for p in module.parameters())


def quantizable_linears(module: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Frozen plain linear layers by name: not adapters, not already quantised (bitsandbytes subclasses)."""
    return {
        name: child
        for name, child in module.named_modules()
        if isinstance(child, torch.nn.Linear)
        and bitsandbytes_class(child) is None
        and not is_adapter(name, child)
    }


@dataclass(frozen=True)
class KeepRules:
    """Modules a quantised mode leaves unquantised (in the compute dtype).

    Args:
        vision: the whole vision tower (`visual`, merger included).
        merger: the vision-to-language merger/projector (`visual.merger`); matters when `vision` is false.
        lm_head: the output projection.
        first_layers / last_layers: this many decoder layers at each end of the language model.
        modules: more dotted paths (see the module docstring); each must match some module.
    """

    vision: bool = True
    merger: bool = True
    lm_head: bool = True
    first_layers: int = 0
    last_layers: int = 0
    modules: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        for option, value in (
            ("keep_first_layers", self.first_layers),
            ("keep_last_layers", self.last_layers),
        ):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"precision.{option}={value!r} must be a whole number >= 0")
        for entry in self.modules:
            if not isinstance(entry, str) or not entry.strip("."):
                raise ValueError(
                    f"precision.keep_modules entry {entry!r} is not a module path; write e.g. 'visual.merger'"
                )

    def patterns(self, names: list[str]) -> dict[str, re.Pattern]:
        """Each rule's label (as `summary` reports it) and pattern, for a model with module `names`."""
        rules: dict[str, str] = {}
        if self.vision:
            rules["vision tower (visual)"] = "visual"
        if self.merger:
            rules["merger (visual.merger)"] = "visual.merger"
        if self.lm_head:
            rules["lm_head"] = "lm_head"
        if self.first_layers or self.last_layers:
            count = decoder_layer_count(names)
            if count == 0:
                raise ValueError(
                    f"precision.keep_first_layers={self.first_layers} / keep_last_layers={self.last_layers} "
                    "need decoder layers named '...language_model.layers.N', and this model has none; "
                    "set both to 0 or name the layers in precision.keep_modules"
                )
            if self.first_layers + self.last_layers >= count:
                raise ValueError(
                    f"precision.keep_first_layers={self.first_layers} + keep_last_layers={self.last_layers} "
                    f"keeps all {count} decoder layers, so nothing would be quantised; lower them or use "
                    "precision=bf16"
                )
            kept = [*range(self.first_layers), *range(count - self.last_layers, count)]
            for index in kept:
                rules[f"decoder layer {index}"] = f"language_model.layers.{index}"
        for entry in self.modules:
            rules[entry] = entry.strip(".")
        return {label: path_pattern(path) for label, path in rules.items()}


def decoder_layer_count(names: list[str]) -> int:
    """Number of language-model decoder layers among module `names` (0 if there are none)."""
    indices = [int(m.group(1)) for name in names if (m := DECODER_LAYER.search(name))]
    return max(indices) + 1 if indices else 0


@dataclass
class QuantizationPlan:
    """The outcome of applying `KeepRules` to a model.

    Attributes:
        quantize: names of the linear layers to convert.
        kept: rule label -> names of the linear layers that rule keeps unquantised.
    """

    quantize: list[str]
    kept: dict[str, list[str]]


def plan_quantization(module: torch.nn.Module, rules: KeepRules, mode: str) -> QuantizationPlan:
    """Split the quantisable linear layers of `module` into converted and kept ones; validates `rules`.

    Raises:
        ValueError: a `keep_modules` entry matches no module, or nothing is left to quantise.
    """
    names = [name for name, _ in module.named_modules()]
    patterns = rules.patterns(names)
    for entry in rules.modules:
        if not any(patterns[entry].search(name) for name in names):
            examples = [n for n in quantizable_linears(module) if "layers.0." in n][:2]
            raise ValueError(
                f"precision.keep_modules entry {entry!r} matches no module of the model; use dotted paths "
                f"such as {', '.join(repr(e) for e in examples) or repr('visual.merger')} ('*' matches one "
                "level, e.g. 'layers.*.mlp.down_proj')"
            )
    plan = QuantizationPlan(quantize=[], kept={label: [] for label in patterns})
    for name in quantizable_linears(module):
        label = next((label for label, pattern in patterns.items() if pattern.search(name)), None)
        if label is None:
            plan.quantize.append(name)
        else:
            plan.kept[label].append(name)
    if not plan.quantize:
        raise ValueError(
            f"precision={mode} found no linear layer to quantise (all are adapters or kept by "
            f"{list(patterns)}); loosen the keep options or use precision=bf16"
        )
    return plan
