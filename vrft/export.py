"""`python -m vrft.export <adapter> <output>`: a trained adapter merged into its base, as a model folder.

The output loads with `AutoModelForImageTextToText.from_pretrained(output)`, `AutoTokenizer` and
`Qwen2VLImageProcessorPil` in plain transformers, with no peft and no vrft (`AutoProcessor` builds Qwen2-VL's
video processor too, which needs torchvision, not a dependency of vrft):

- default: the merged weights in bf16 (`--dtype fp32` keeps full precision);
- `--int4`: the merged weights quantised again to 4 bits with bitsandbytes (nf4, double quantisation, the
  vision tower and lm_head kept in bf16: the defaults of `precision=int4`), saved pre-quantised.

The merge is `merge_and_requantize` on the dense base, the same function the held-out check scores the
deployed model with. The 4-bit folder is quantised by transformers' bitsandbytes integration at load and
saved from there, because that is the layout (`quantization_config` in config.json, packed weights and
quant-state tensors) that `from_pretrained` reads back; vrft's own quantised layers carry no such config.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, BitsAndBytesConfig

from vrft.evaluation.adapters import adapter_shapes, shape_mismatch
from vrft.models.policy import ModelSpec, is_adapter_folder, load_base_model
from vrft.models.presets import CHECKPOINT_PRESETS, model_class
from vrft.models.processor import load_processor, save_processor
from vrft.paths import check_folder
from vrft.precision import merge_and_requantize
from vrft.quiet import silence_upstream_noise

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def adapter_config(adapter: Path) -> dict:
    """The adapter's `adapter_config.json`, read before anything loads: peft would fail on it minutes later."""
    config = adapter / "adapter_config.json"
    if not is_adapter_folder(adapter) and (adapter / "config.json").is_file():
        # `lora=full` (algorithm=sft) writes the trained model itself where a LoRA run writes its adapter
        processor = adapter.parent.parent / "processor"
        raise ValueError(
            f"'{adapter}' holds a whole model (config.json; a lora=full run's weights), not a peft adapter: there "
            f"is nothing to merge; it loads as it is with AutoModelForImageTextToText.from_pretrained('{adapter}'), "
            f"and its run's processor with AutoTokenizer / Qwen2VLImageProcessorPil from '{processor}'"
        )
    if not is_adapter_folder(adapter):
        raise FileNotFoundError(f"'{adapter}' {not_an_adapter(adapter)}")
    try:
        settings = json.loads(config.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"'{config}' is not valid JSON ({error}); pass an intact peft adapter folder such as "
            "<run>/adapter/final"
        ) from None
    return settings if isinstance(settings, dict) else {}


def not_an_adapter(path: Path) -> str:
    """Why `path` is no adapter folder and which folder to pass instead: a run folder and a checkpoint file
    (the two paths a user holds after training) name their run's adapters."""
    fix = "pass a peft adapter folder such as <run>/adapter/final"
    if path.is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else None
        what = "is a Lightning checkpoint" if path.suffix == ".ckpt" else "is a file"
        return f"{what}, not an adapter folder; {_run_adapters(run) if run else fix}"
    if not path.exists():
        return f"does not exist; {fix}"
    if (path / "adapter").is_dir() or (path / "checkpoints").is_dir():
        return f"is a run folder, not an adapter folder; {_run_adapters(path)}"
    return f"has no adapter_config.json; {fix}"


def _run_adapters(run: Path) -> str:
    steps = sorted(
        (folder for folder in (run / "adapter").glob("step-*") if is_adapter_folder(folder)),
        key=lambda folder: int(folder.name.removeprefix("step-")) if folder.name[5:].isdigit() else -1,
    )
    if is_adapter_folder(run / "adapter" / "final"):
        return f"pass its adapter '{run / 'adapter' / 'final'}' (or one of its {len(steps)} step-N adapters)"
    if steps:
        return f"it has no adapter/final (it stopped before the end): pass its latest, '{steps[-1]}'"
    return (
        f"run '{run}' saved no adapter (one is written with every checkpoint, "
        "callbacks.checkpoint.every_n_train_steps, and at the end of training; it stopped before either): "
        "pass another run's <run>/adapter/final"
    )


def adapter_base(adapter: Path) -> str:
    """The base checkpoint recorded in the adapter's `adapter_config.json`."""
    base = adapter_config(adapter).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(
            f"adapter '{adapter}' records no base model (base_model_name_or_path); pass --base <model folder>"
        )
    return base


def base_model(adapter: Path, base: str | None = None) -> str:
    """The base to merge into: `base` (`--base`), else the one the adapter records; checked before the load.

    The loader's own error names `model.name_or_path`, a key export does not have: a missing base is named
    here by where it came from.
    """
    if base is None:
        base = adapter_base(adapter)
        source = f"adapter '{adapter}' records base model '{base}', which"
    else:
        adapter_config(adapter)  # an unreadable config is named before the load, as it is without --base
        source = f"--base '{base}'"
    fix = "pass --base <a local Qwen2-VL / Qwen2.5-VL checkpoint folder>"
    preset = Path(base).name.rsplit("-", 1)[0]
    if preset in CHECKPOINT_PRESETS and not Path(base).exists():
        # a run of the tiny or small preset records its cache folder, which another machine does not have
        fix = f"pass --base {preset} (the built-in preset it was trained on, built again from its seed)"
    ModelSpec(name_or_path=base).config(what=source, fix=fix, weights=True)
    check_adapter_fits(adapter, base)
    return base


def check_adapter_fits(adapter: Path, base: str) -> None:
    """A `ValueError` when the adapter's LoRA shapes do not fit `base` (another model, or another rank than its
    config says), found on the meta device before the base loads; peft's own is a page of size mismatches."""
    settings = adapter_config(adapter)
    if not (adapter / "adapter_model.safetensors").is_file():
        if (adapter / "adapter_model.bin").is_file():
            return  # peft's older format: read only by the load, which names a mismatch itself
        raise FileNotFoundError(
            f"adapter '{adapter}' has no adapter_model.safetensors (its weights; a copy cut short?); pass a "
            "whole peft adapter folder such as <run>/adapter/final"
        )
    problem = shape_mismatch(adapter, ModelSpec(name_or_path=base), unknown_modules=True)
    if problem is not None:
        raise ValueError(
            f"adapter '{adapter}' does not fit base '{base}': {problem}; pass --base <the model it was trained on>"
        )
    rank = (
        None if settings.get("rank_pattern") else settings.get("r")
    )  # the shapes against the adapter's own r
    for name, shape in adapter_shapes(adapter).items():
        module_name, _, part = name.removeprefix("base_model.model.").rpartition(".lora_")
        if rank is None or part[:2] not in ("A.", "B."):
            continue
        held = shape[0 if part[0] == "A" else 1]  # lora_A is [r, in], lora_B [out, r]
        if held != rank:
            raise ValueError(
                f"adapter '{adapter}': its lora_{part[0]} of '{module_name}' has rank {held}, its "
                f"adapter_config.json says r={rank}; the folder mixes two adapters: copy the adapter folder again"
            )


def untie_output_embeddings(model: torch.nn.Module) -> None:
    """Record in the config that lm_head no longer shares the input embeddings (when a merge split them).

    An adapter on a tied lm_head (the tiny warm start has one) merges into a new lm_head matrix; with
    `tie_word_embeddings` left on, `from_pretrained` would tie it back to the unchanged input embeddings.
    """
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or output.weight.data_ptr() == inputs.weight.data_ptr():
        return
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def merged_model(adapter: Path, base: str | None = None) -> torch.nn.Module:
    """The base (fp32, on CPU) with the adapter merged in; no peft wrappers left."""
    spec = ModelSpec(name_or_path=base or adapter_base(adapter))
    peft_model = PeftModel.from_pretrained(load_base_model(spec, torch.float32), adapter)
    model = merge_and_requantize(peft_model, inplace=True)
    untie_output_embeddings(model)
    return model


def processor_folder(adapter: Path, base: str) -> Path:
    """The run's saved processor (`<run>/processor`, next to `<run>/adapter/<name>`), else the base's."""
    run_processor = adapter.parent.parent / "processor"
    return (
        run_processor if (run_processor / "preprocessor_config.json").is_file() else ModelSpec(base).folder()
    )


def export(
    adapter: Path, output: Path, dtype: str = "bf16", int4: bool = False, base: str | None = None
) -> Path:
    """Write the merged model (and its processor) to `output`; returns `output`."""
    base = base_model(adapter, base)
    model = merged_model(adapter, base).to(DTYPES[dtype])
    source = processor_folder(adapter, base)
    size = json.loads((source / "preprocessor_config.json").read_text()).get("size", {})
    processor = load_processor(source, size.get("shortest_edge", 3136), size.get("longest_edge", 401408))
    if not int4:
        model.save_pretrained(output)
    else:
        with tempfile.TemporaryDirectory() as staging:
            model.save_pretrained(staging)
            del model
            quantization = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
                # precision=int4's keep_vision / keep_lm_head. transformers matches these from the start of a
                # module's name or as its suffix: "visual" alone matched nothing ("model.visual.blocks.0...")
                # and the vision tower was quantised too (and failed in bitsandbytes' CPU forward).
                llm_int8_skip_modules=["model.visual", "lm_head"],
            )
            quantized = type_of_model(staging).from_pretrained(staging, quantization_config=quantization)
            quantized.save_pretrained(output)
    save_processor(processor, output)
    return output


def type_of_model(folder: str):
    """The transformers class that loads the Qwen2-VL / Qwen2.5-VL checkpoint in `folder`."""
    return model_class(AutoConfig.from_pretrained(folder))


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m vrft.export", description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path, help="a peft adapter folder, e.g. <run>/adapter/final")
    parser.add_argument("output", type=Path, help="the model folder to write (must not exist)")
    parser.add_argument("--int4", action="store_true", help="quantise the merged weights to 4 bits (nf4)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype of the merged weights")
    parser.add_argument("--base", help="base checkpoint folder (default: the one in adapter_config.json)")
    args = parser.parse_args(argv)
    silence_upstream_noise()
    if args.output.exists():
        parser.exit(2, f"vrft: error: output '{args.output}' exists; pass a new folder\n")
    try:  # a file on its path, or a place that cannot be written: saving would fail only after the merge
        check_folder(args.output, "output", "pass a new folder")
        args.output.mkdir(parents=True)
    except ValueError as error:
        parser.exit(2, f"vrft: error: {error}\n")
    except OSError as error:
        parser.exit(
            2,
            f"vrft: error: output '{args.output}' cannot be made ({error.strerror}); pass a new folder "
            "in a place you can write\n",
        )
    try:
        folder = export(args.adapter, args.output, args.dtype, args.int4, args.base)
    except (FileNotFoundError, ValueError) as error:
        shutil.rmtree(args.output, ignore_errors=True)
        parser.exit(2, f"vrft: error: {error}\n")
    except BaseException:  # no half-written model folder left that a later load would take for a whole one
        shutil.rmtree(args.output, ignore_errors=True)
        raise
    kind = "4-bit (bitsandbytes nf4)" if args.int4 else args.dtype
    print(
        f"merged model ({kind}) written to {folder}; load it with AutoModelForImageTextToText.from_pretrained "
        "(its processor with AutoTokenizer / Qwen2VLImageProcessorPil)"
    )


if __name__ == "__main__":
    main()
