"""Built-in model presets that need no download.

`tiny` is a few-million-parameter Qwen2-VL with the real Qwen2 tokenizer, written once to a cache folder
and then loaded like any local checkpoint. The other presets are architecture-exact Qwen2-VL / Qwen2.5-VL
models with random weights: right for memory and speed work, useless for answers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    PretrainedConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from vrft.models.processor import ImageOnlyQwen2VLProcessor
from vrft.models.tokenizer import QWEN2_VL_CHAT_TEMPLATE, build_qwen2_tokenizer
from vrft.paths import cache_key, cache_root

log = logging.getLogger(__name__)

# Token ids shared by every Qwen2-VL / Qwen2.5-VL checkpoint (they index the real Qwen2 vocabulary).
VISION_TOKEN_IDS = dict(
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653
)
QWEN2_VOCAB = 151936  # embedding rows: 151657 real tokens padded to a multiple of 128


def _qwen2vl(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tie: bool, **vision):
    head_dim = hidden // heads
    # mrope splits the rotary half-dimension into (temporal, height, width) sections.
    half = head_dim // 2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(
        vocab_size=QWEN2_VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32768,
        rope_scaling={"type": "mrope", "mrope_section": mrope},
        rope_theta=1_000_000.0,
        tie_word_embeddings=tie,
    )
    return text, vision


def preset_config(name: str) -> PretrainedConfig:
    """The model config of a built-in preset; raises with the list of presets if `name` is unknown."""
    if name == "tiny":
        text, _ = _qwen2vl(64, 128, 2, 4, 2, tie=True)
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        return Qwen2VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=True, **VISION_TOKEN_IDS
        )
    if name == "small":
        # 8 layers of hidden 512 (GQA 8/2 heads, MLP 1408): 2.82M per layer, 22.5M in the language model, plus a
        # 4-block vision tower of width 256 (5.0M with patch embedding and merger): 27.6M non-embedding
        # parameters, with the real vocabulary's 77.8M tied embeddings on top (105.4M in all). Big enough that quantising it means something,
        # small enough that its SFT warm start trains on one GPU in minutes (bench/learning).
        text, _ = _qwen2vl(512, 1408, 8, 8, 2, tie=True)
        vision = dict(depth=4, embed_dim=256, hidden_size=512, num_heads=4, mlp_ratio=4)
        return Qwen2VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=True, **VISION_TOKEN_IDS
        )
    if name in ("qwen2vl-2b", "qwen2vl-7b"):
        hidden, inter, heads, kv, tie = (
            (1536, 8960, 12, 2, True) if name == "qwen2vl-2b" else (3584, 18944, 28, 4, False)
        )
        text, _ = _qwen2vl(hidden, inter, 28, heads, kv, tie)
        # mrope of the released checkpoints is [16, 24, 24] for head_dim 128.
        text["rope_scaling"]["mrope_section"] = [16, 24, 24]
        vision = dict(depth=32, embed_dim=1280, hidden_size=hidden, num_heads=16, mlp_ratio=4)
        return Qwen2VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=tie, **VISION_TOKEN_IDS
        )
    if name in ("qwen25vl-3b", "qwen25vl-7b"):
        if name == "qwen25vl-3b":
            hidden, inter, layers, heads, kv, tie = 2048, 11008, 36, 16, 2, True
        else:
            hidden, inter, layers, heads, kv, tie = 3584, 18944, 28, 28, 4, False
        text, _ = _qwen2vl(hidden, inter, layers, heads, kv, tie)
        text["rope_scaling"]["mrope_section"] = [16, 24, 24]
        vision = dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=hidden,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2,
        )
        return Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=tie, **VISION_TOKEN_IDS
        )
    raise ValueError(
        f"unknown model preset '{name}'; choose one of {sorted(PRESETS)} or set model.name_or_path to a local "
        "Hugging Face checkpoint folder"
    )


# Presets built once into the vrft cache as checkpoint folders (trainable from scratch with a warm start);
# the others are instantiated with random weights for memory and speed figures only.
CHECKPOINT_PRESETS = ("tiny", "small")
PRESETS = ("tiny", "small", "qwen2vl-2b", "qwen2vl-7b", "qwen25vl-3b", "qwen25vl-7b")


def model_class(config: PretrainedConfig) -> type:
    """The generation class for a Qwen2-VL or Qwen2.5-VL config."""
    return (
        Qwen2_5_VLForConditionalGeneration
        if isinstance(config, Qwen2_5_VLConfig)
        else Qwen2VLForConditionalGeneration
    )


def random_preset(name: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Instantiate an architecture-exact preset with random weights (on CPU, in `dtype`)."""
    config = preset_config(name)
    log.warning(
        "model preset '%s' has RANDOM WEIGHTS: fine for memory and speed figures, meaningless for accuracy",
        name,
    )
    torch.manual_seed(seed)
    return model_class(config)._from_config(config, dtype=dtype)


def build_processor(min_pixels: int, max_pixels: int) -> ImageOnlyQwen2VLProcessor:
    """A Qwen2-VL processor (PIL image backend, real tokenizer) for the built-in presets."""
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return ImageOnlyQwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=build_qwen2_tokenizer(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def tiny_checkpoint(seed: int = 0) -> Path:
    """Path of the cached `tiny` checkpoint folder, written on first use (model + processor)."""
    return preset_checkpoint("tiny", seed)


def preset_checkpoint(name: str, seed: int = 0) -> Path:
    """Path of the cached checkpoint folder of preset `name` (one of `CHECKPOINT_PRESETS`), written on first
    use (model + processor)."""
    config = preset_config(name)
    key = cache_key(config.to_json_string() + f"seed={seed}")
    folder = cache_root() / f"{name}-{key}"
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    log.info("building the %s preset checkpoint in %s (once)", name, folder)
    # Forked: building the cache must not reseed the run that triggered it (it would sample differently
    # from every later run with the same seed, which finds the checkpoint already built).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)._from_config(config, dtype=torch.float32)
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    model.save_pretrained(partial)
    processor = build_processor(min_pixels=3136, max_pixels=12544)
    processor.tokenizer.save_pretrained(partial)
    processor.image_processor.save_pretrained(partial)
    (partial / "vrft_preset.json").write_text(json.dumps({"preset": name, "seed": seed}))
    # An atomic rename so that a concurrent or interrupted build never leaves a half-written cache.
    try:
        partial.rename(folder)
    except OSError:
        # Another process (a DDP rank started at the same moment) renamed its build into place first.
        shutil.rmtree(partial, ignore_errors=True)
        if not folder.is_dir():
            raise
    return folder


def box_convention(name_or_path: str) -> str:
    """How the model writes boxes: `qwen2vl` (0..1000 grid) for Qwen2-VL, `absolute` (pixels) for Qwen2.5-VL.

    Read from the preset name or the checkpoint's `config.json`; an unreadable folder defaults to `qwen2vl`
    (loading the model reports the real problem later).
    """
    if name_or_path in PRESETS:
        return "absolute" if name_or_path.startswith("qwen25") else "qwen2vl"
    config = Path(name_or_path).expanduser() / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type", "")
    except (OSError, ValueError):
        return "qwen2vl"
    return "absolute" if model_type == "qwen2_5_vl" else "qwen2vl"
