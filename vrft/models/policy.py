"""The policy: a Qwen2-VL / Qwen2.5-VL checkpoint (or built-in preset) with a LoRA adapter from peft."""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoConfig, GenerationConfig

from vrft.models.frozen import run_without_autograd
from vrft.models.presets import (
    CHECKPOINT_PRESETS,
    PRESETS,
    build_processor,
    model_class,
    preset_checkpoint,
    preset_config,
    random_preset,
)
from vrft.models.processor import load_processor
from vrft.models.sharded import clean_name, is_sharded, unwrap

log = logging.getLogger(__name__)

# With `lora.init_adapter`, a frozen copy of the starting adapter under this name is GRPO's reference policy.
REFERENCE_ADAPTER = "reference"
# Every linear projection of the language model; the vision tower (Qwen2.5-VL's has gate/up/down_proj too)
# and the merger stay frozen unless `lora.train_vision` is set.
LANGUAGE_MODEL_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TARGETS = r".*visual.*\.(qkv|proj|fc1|fc2|gate_proj|up_proj|down_proj|mlp\.0|mlp\.2)"


@dataclass
class ModelSpec:
    """Which checkpoint to load and how images are budgeted.

    Args:
        name_or_path: a local Hugging Face checkpoint folder of Qwen2-VL or Qwen2.5-VL, or a built-in preset
            (`tiny`, `small`, `qwen2vl-2b`, `qwen2vl-7b`, `qwen25vl-3b`, `qwen25vl-7b`; `tiny` and `small` are
            built once into the cache and trained from a warm start, the others are random-weight stand-ins).
        min_pixels / max_pixels: image budget; visual tokens per image = pixels / (28 * 28) after merging.
        gradient_checkpointing: recompute decoder activations in the backward (saves most activation memory,
            costs about one extra forward).
        attn_implementation: `sdpa` (default) or `eager`; `flash_attention_2` where installed.
    """

    name_or_path: str = "tiny"
    min_pixels: int = 3136
    max_pixels: int = 401408
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    seed: int = 0

    def __post_init__(self):
        for key in ("min_pixels", "max_pixels"):  # the image processor's smallest image: one 28 x 28 patch
            if getattr(self, key) < 28 * 28:
                raise ValueError(
                    f"model.{key}={getattr(self, key)} must be >= 784 (one 28 x 28 patch; visual tokens per image "
                    "= pixels / 784), e.g. model.max_pixels=401408"
                )
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"model.min_pixels={self.min_pixels} exceeds model.max_pixels={self.max_pixels}; lower min_pixels"
            )
        self._check_not_quantised()

    def _check_not_quantised(self) -> None:
        # A pre-quantised folder (`vrft.export --int4`, or a hub 4-bit upload) loads through transformers'
        # quantiser, not vrft's precision plugins: the rollout engines and QAT would see weights they did not
        # pack, and bitsandbytes failed deep inside the first forward (CPU) instead.
        config = Path(self.name_or_path).expanduser() / "config.json"
        if self.name_or_path in PRESETS or not config.is_file():
            return  # a missing folder is named by `folder()`
        try:
            quantisation = json.loads(config.read_text()).get("quantization_config")
        except (OSError, ValueError, AttributeError):
            return  # transformers names an unreadable config.json when it loads it
        if quantisation:
            method = quantisation.get("quant_method", "?") if isinstance(quantisation, dict) else "?"
            raise ValueError(
                f"model.name_or_path='{self.name_or_path}' holds pre-quantised weights (quantization_config: "
                f"{method}); vrft quantises an unquantised checkpoint itself: point model.name_or_path at the "
                "bf16/fp16 model and pick precision=int4 (or int8), e.g. the folder `vrft.export` writes "
                "without --int4"
            )

    @property
    def is_random_preset(self) -> bool:
        return self.name_or_path in PRESETS and self.name_or_path not in CHECKPOINT_PRESETS

    def folder(self, what: str | None = None, fix: str | None = None) -> Path:
        """The checkpoint folder to load (building the tiny or small preset on first use), its config.json
        checked (`check_config`).

        Args:
            what: how a missing folder's error names the value, for callers whose user set it by another
                name than `model.name_or_path` (`vrft.export`'s `--base`); e.g. "--base '/models/x'".
            fix: what that error tells the user to do instead; None: set `model.name_or_path`.
        """
        if self.name_or_path in CHECKPOINT_PRESETS:
            return preset_checkpoint(self.name_or_path, self.seed)
        folder = Path(self.name_or_path).expanduser()
        what = what or f"model.name_or_path='{self.name_or_path}'"
        default_fix = (
            "set it to a local Hugging Face checkpoint folder of Qwen2-VL / Qwen2.5-VL (with config.json and "
            f"weights) or to a preset: {', '.join(PRESETS)}"
        )
        if not (folder / "config.json").exists():
            reason = "does not exist" if not folder.exists() else "has no config.json"
            if is_adapter_folder(folder):  # a run's adapter/final: the base goes here, the adapter elsewhere
                base = adapter_base_name(folder)
                reason = f"is a peft adapter (trained on '{base}'), not a model"
                default_fix = (
                    "set it to that base and pass the adapter as lora.init_adapter= (vrft.train) or "
                    "adapters=[...] (vrft.evaluate)"
                )
            raise FileNotFoundError(f"{what} {reason}; {fix or default_fix}")
        check_config(folder, what, fix or default_fix)
        return folder

    def config(self, what: str | None = None, fix: str | None = None, weights: bool = False):
        """The checkpoint's `PretrainedConfig` (`folder()` checks it first); `what` and `fix` as there.

        `weights`: the folder must also hold weight files (a load, not a plan); transformers' own error names
        no setting.
        """
        if self.is_random_preset:
            return preset_config(self.name_or_path)
        folder = self.folder(what, fix)
        if weights and not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
            what = what or f"model.name_or_path='{self.name_or_path}'"
            raise ValueError(
                f"{what} has a config.json but no weights (*.safetensors or pytorch_model*.bin); "
                f"{fix or 'point it at the whole checkpoint folder'}"
            )
        return AutoConfig.from_pretrained(folder)


def check_config(folder: Path, what: str, fix: str) -> None:
    """A `ValueError` naming `what` when `folder`'s config.json is no whole Qwen2-VL / Qwen2.5-VL config.

    transformers accepts a config.json that is cut, of another architecture or missing its vision part, and
    fails only later, deep in the planner or the load (a JSON OSError, `no attribute 'vision_config'`), or
    fills in the 2B model's sizes: a plan of a 7B folder with a partial config planned a 2B vision tower.
    """
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{what} has a config.json that cannot be read ({error}); {fix}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(
            f"{what} is {f'a {model_type!r}' if model_type else 'an untyped'} checkpoint (config.json's "
            f"model_type); vrft trains Qwen2-VL ('qwen2_vl') and Qwen2.5-VL ('qwen2_5_vl') models: {fix}"
        )
    text = raw.get("text_config") or raw
    missing = [key for key in ("vision_config",) if not isinstance(raw.get(key), dict)]
    missing += [key for key in ("hidden_size", "num_hidden_layers", "vocab_size") if key not in text]
    if missing:
        raise ValueError(
            f"{what} has a partial config.json (no {', '.join(missing)}; transformers would fill in the 2B "
            f"model's defaults); {fix}"
        )


@dataclass
class LoraSpec:
    """LoRA adapter settings (peft). Only adapter weights train; the base model stays frozen.

    Args:
        r / alpha / dropout: rank, scaling numerator and dropout of the adapters. Dropout 0 keeps the rollout
            policy and the policy being updated identical, so the on-policy ratio is exactly 1.
        target_modules: regex (full match) over module names; default every language-model projection.
        train_vision: also adapt the vision tower and merger.
        init_adapter: a peft adapter folder to start from (e.g. an SFT warm start) instead of a fresh
            adapter; its own r/alpha/targets then apply.
        full: no adapter: train the weights of the `target_modules` themselves (full fine-tuning; SFT
            only, in an unquantised precision). r/alpha/dropout/init_adapter do not apply.
    """

    r: int = 64
    alpha: int = 128
    dropout: float = 0.0
    target_modules: str = LANGUAGE_MODEL_TARGETS
    train_vision: bool = False
    init_adapter: str | None = None
    full: bool = False

    def __post_init__(self):
        if self.r < 1 and not self.full:
            raise ValueError(f"lora.r={self.r} must be >= 1 (the adapter's rank; 64 is Visual-RFT's)")
        if self.alpha <= 0 and not self.full:
            raise ValueError(f"lora.alpha={self.alpha} must be > 0 (the adapter's scale is alpha / r)")
        if not 0 <= self.dropout < 1:
            raise ValueError(
                f"lora.dropout={self.dropout} must be in [0, 1) (0 keeps the rollout deterministic)"
            )
        try:
            re.compile(self.target_modules)
        except re.error as error:
            raise ValueError(
                f"lora.target_modules={self.target_modules!r} is not a regular expression ({error}); peft matches "
                "it against module names, e.g. lora.target_modules='.*language_model.*\\.(q_proj|v_proj)'"
            ) from None

    def peft_config(self) -> LoraConfig:
        target = self.target_modules
        if self.train_vision:
            target = f"({target})|({VISION_TARGETS})"
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=target)


def load_base_model(spec: ModelSpec, dtype: torch.dtype, weights: bool = True) -> torch.nn.Module:
    """The base model on CPU in `dtype`, frozen (quantisation, if any, is the precision plugin's job).

    `weights=False`: the same modules, dtypes and generation settings on the meta device, nothing read from
    disk (an FSDP rank that receives rank 0's weights, `vrft.runtime.weight_sync`).
    """
    # Lightning calls configure_model under a CUDA default-device context: without this the full-precision
    # model would materialise on the GPU before the precision plugin quantises it (7B bf16: 16.6 GB).
    with torch.device("cpu" if weights else "meta"):
        return _load_base_model(spec, dtype, weights)


def _load_base_model(spec: ModelSpec, dtype: torch.dtype, weights: bool) -> torch.nn.Module:
    if spec.is_random_preset:
        model = random_preset(spec.name_or_path, dtype, seed=spec.seed)  # on meta: the structure alone
    else:
        folder = spec.folder()
        config = spec.config(weights=weights)
        if weights:
            model = model_class(config).from_pretrained(
                folder, dtype=dtype, attn_implementation=spec.attn_implementation
            )
        else:
            model = model_class(config)._from_config(
                config, dtype=dtype, attn_implementation=spec.attn_implementation
            )
            # from_pretrained also reads the folder's sampling defaults, which generate() falls back on.
            if (folder / "generation_config.json").exists():
                model.generation_config = GenerationConfig.from_pretrained(folder)
    model.requires_grad_(False)
    return model


def load_processor_for(spec: ModelSpec):
    """The processor matching `spec`, with its image budget."""
    if spec.is_random_preset:
        return build_processor(spec.min_pixels, spec.max_pixels)
    return load_processor(spec.folder(), spec.min_pixels, spec.max_pixels)


def is_adapter_folder(folder: Path) -> bool:
    """`folder` holds a peft adapter (its `adapter_config.json`): what `init_adapter_folder` requires."""
    return (folder / "adapter_config.json").is_file()


def adapter_base_name(folder: Path) -> str:
    """The base an adapter folder records (`base_model_name_or_path`), or "an unrecorded model"."""
    try:
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    return base if isinstance(base, str) and base else "an unrecorded model"


def init_adapter_folder(init_adapter: str | Path) -> Path:
    """`lora.init_adapter` as the peft adapter folder it must be, or a `ValueError` naming it.

    `vrft.validation` calls it before the model loads; `attach_lora` calls it again because tests and the
    Python API reach it without validation, and peft, given a folder without `adapter_config.json`, looks
    the path up on the Hub and then fails naming no setting.
    """
    folder = Path(str(init_adapter)).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"lora.init_adapter='{init_adapter}' is not a folder; point it at a peft adapter folder such as "
            "<run_dir>/adapter/final, or set lora.init_adapter=null for a fresh adapter"
        )
    if not is_adapter_folder(folder):
        raise ValueError(
            f"lora.init_adapter='{init_adapter}' has no adapter_config.json; point it at a peft adapter folder "
            "such as <run_dir>/adapter/final"
        )
    return folder


def attach_lora(model: torch.nn.Module, lora: LoraSpec, gradient_checkpointing: bool) -> PeftModel:
    """Wrap `model` with a LoRA adapter (fresh, or `lora.init_adapter`); only adapter weights require grad."""
    if not lora.train_vision:
        # A frozen vision tower runs under no_grad: none of its activations can be kept for a backward.
        run_without_autograd(model.model.visual)
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs, so no input-embedding grad hook is needed.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.full:
        return _unfreeze_targets(model, lora)
    if lora.init_adapter is not None:
        folder = init_adapter_folder(lora.init_adapter)
        with warnings.catch_warnings():
            # On the meta device (an FSDP rank that receives rank 0's weights) torch warns once per adapter
            # matrix that loading into it is a no-op: it is, and rank 0's values arrive before sharding.
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            peft_model = PeftModel.from_pretrained(model, folder, is_trainable=True)
            # The policy GRPO starts from is its KL reference, not the bare base: a frozen copy of the adapter.
            peft_model.load_adapter(folder, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        return peft_model
    # The adapter's matrices are made, and randomly initialised, on the device of the base they wrap, not on
    # whatever default device the caller set: Lightning's single-device strategies build the model under a
    # CUDA default-device context and its FSDP strategy does not, so without this the first adapter (drawn
    # from the CUDA generator in one, the CPU generator in the other) would depend on the strategy.
    with torch.device(next(model.parameters()).device):
        peft_model = get_peft_model(model, lora.peft_config())
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"lora.target_modules='{lora.target_modules}' matched no module of the model; "
            "use a regex over names like 'model.language_model.layers.0.self_attn.q_proj'"
        )
    return peft_model


def _unfreeze_targets(model: torch.nn.Module, lora: LoraSpec) -> torch.nn.Module:
    """`lora.full`: the targeted modules' own weights train; everything else stays frozen."""
    if lora.init_adapter is not None:
        raise ValueError(
            f"lora.full=true trains the weights themselves and cannot start from lora.init_adapter="
            f"'{lora.init_adapter}'; merge that adapter into a checkpoint first, or set lora.full=false"
        )
    target = re.compile(lora.peft_config().target_modules)
    unfrozen = 0
    for name, module in model.named_modules():
        if target.fullmatch(name):
            module.requires_grad_(True)
            unfrozen += 1
    if unfrozen == 0:
        raise ValueError(
            f"lora.target_modules='{lora.target_modules}' matched no module of the model; "
            "use a regex over names like 'model.language_model.layers.0.self_attn.q_proj'"
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("lora.full: %d modules train their own weights (%d parameters); no adapter", unfrozen, trainable)
    return model


def base_model(policy: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under the policy: inside the peft wrapper (and FSDP's, when sharded), or the
    policy itself (`lora.full`)."""
    policy = unwrap(policy)
    return policy.get_base_model() if isinstance(policy, PeftModel) else policy


def save_adapter(policy: PeftModel, folder: str | Path, state_dict: dict | None = None) -> None:
    """Write the trained adapter in peft format (`PeftModel.from_pretrained(base, folder)` loads it).

    Only the trained adapter: a frozen reference copy (`REFERENCE_ADAPTER`) stays out, and so do embedding
    matrices (peft would copy the whole tied embedding when `lm_head` is adapted; the base weights never
    change, so the base checkpoint already holds it).

    Args:
        policy: the peft model, or its FSDP root.
        folder: where the adapter goes.
        state_dict: the policy's weights as `policy.state_dict()` names them; None reads them from the policy.
            An FSDP root needs one, gathered with every rank taking part (its own `state_dict` is a
            collective that this rank would join alone).
    """
    sharded, policy = is_sharded(policy), unwrap(policy)
    if not isinstance(policy, PeftModel):
        policy.save_pretrained(str(folder), state_dict=state_dict)  # a fully trained model (lora disabled)
        return
    adapters = [name for name in policy.peft_config if name != REFERENCE_ADAPTER]
    if not sharded:
        policy.save_pretrained(
            str(folder), selected_adapters=adapters, save_embedding_layers=False, state_dict=state_dict
        )
        return
    if state_dict is None:
        raise ValueError("save_adapter: an FSDP-sharded policy needs the gathered state_dict to save from")
    # peft picks an adapter's weights by module name, and FSDP's nested units put `_fsdp_wrapped_module.`
    # inside those names (peft strips a leading one only): it would pick none. peft writes the config and
    # model card; the weights are the trainable ones, under the names peft gives them (adapter name dropped).
    policy.save_pretrained(
        str(folder), selected_adapters=adapters, save_embedding_layers=False, state_dict={}
    )
    active = policy.active_adapter
    trainable = {clean_name(name) for name, param in policy.named_parameters() if param.requires_grad}
    weights = {
        re.sub(rf"\.(lora_\w+)\.{re.escape(active)}(?=\.|$)", r".\1", key): value.contiguous()
        for key, value in state_dict.items()
        if key in trainable
    }
    save_file(weights, str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})
