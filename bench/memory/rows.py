"""The benchmark rows and the settings they share, and composing a row's training config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import vrft.cli  # noqa: F401  (registers the resolvers the configs use, as `python -m vrft.train` does)

CONF = str(Path(__file__).resolve().parents[2] / "conf")
# Every row: completions forced to 256 tokens, 2 prompts x G per rollout, LoRA r=64 on all LM projections,
# one rollout per optimizer step (accumulating 16 prompts only adds stored rollouts, which the planner
# counts), two optimizer steps (the second is steady state), no checkpoint writing.
BASE = [
    "task=classification",
    "data=disk",
    "data.verify_images=false",
    "data.num_workers=0",
    "algorithm.max_new_tokens=256",
    "algorithm.min_new_tokens=256",
    "algorithm.rollout_batch_size=2",
    "algorithm.prompts_per_step=2",
    "lora.r=64",
    "lora.alpha=128",
    "trainer.max_steps=2",
    "plan.enforce=false",  # measure what the planner would refuse too
    "algorithm.evaluator=null",  # no validation in the benchmark (and no pycocotools on the GPU machine)
    "~callbacks.checkpoint",
    "~callbacks.adapter",
    "~callbacks.samples",
    "~callbacks.progress",
]

CAP_24 = "memory_cap_gb=24"  # 16 GB rows run under the 24 GiB cap too; their target is on the measured peak


@dataclass
class Row:
    name: str
    overrides: list[str]
    speed: str = ""  # rollout engines whose decode speed is timed after training
    timeout: int = 120
    extra: list[str] = field(default_factory=list)


SWEEP_2B = ["+hw=rtx4090", "model=qwen2vl-2b", "precision=int4", "trainer.max_steps=1"]
ROWS = [
    # speed rows (run alone first): the targets qwen2vl-2b int4 G=8 and qwen2vl-7b int4 G=8 on 16 GB
    Row(
        "qwen2vl-2b_int4_G8",
        ["+hw=rtx4090", "model=qwen2vl-2b", "precision=int4"],
        "hf,dequant,bf16_copy",
        150,
    ),
    Row(
        "qwen2vl-7b_int4_G8_16g",
        ["+hw=rtx4080-16g", CAP_24, "model=qwen2vl-7b", "precision=int4"],
        "hf,dequant,bf16_copy",
        200,
    ),
    # the other targets, then the scaling sweeps on qwen2vl-2b int4 (one optimizer step each)
    Row(
        "qwen2vl-7b_int4_G16",
        ["+hw=rtx4090", "model=qwen2vl-7b", "precision=int4", "algorithm.group_size=16"],
    ),
    Row("qwen2vl-2b_int8_G8", ["+hw=rtx4090", "model=qwen2vl-2b", "precision=int8"], timeout=100),
    Row("qwen2vl-7b_int8_G8", ["+hw=rtx4090", "model=qwen2vl-7b", "precision=int8"], timeout=240),
    Row("sweep_G4", [*SWEEP_2B, "algorithm.group_size=4"], timeout=80),
    Row("qwen25vl-7b_int4_G8_16g", ["+hw=rtx4080-16g", CAP_24, "model=qwen25vl-7b", "precision=int4"]),
    Row("qwen2vl-2b_mixed_G8", ["+hw=rtx4090", "model=qwen2vl-2b", "precision=mixed"], timeout=100),
    Row("sweep_G16", [*SWEEP_2B, "algorithm.group_size=16"], timeout=80),
    Row("qwen2vl-7b_int4_G8_24g", ["+hw=rtx4090", "model=qwen2vl-7b", "precision=int4"]),
    Row(
        "sweep_len128",
        [*SWEEP_2B, "algorithm.max_new_tokens=128", "algorithm.min_new_tokens=128"],
        timeout=80,
    ),
    Row(
        "sweep_len512",
        [*SWEEP_2B, "algorithm.max_new_tokens=512", "algorithm.min_new_tokens=512"],
        timeout=80,
    ),
    Row("sweep_img128", [*SWEEP_2B, "model.max_pixels=100352"], timeout=80),
    Row("sweep_img256", [*SWEEP_2B, "model.max_pixels=200704"], timeout=80),
]


def compose_row(overrides: list[str], images: str, run_dir: str) -> DictConfig:
    """The training config of a row: `BASE`, the image folder, then the row's overrides."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[*BASE, f"data.path={images}", *overrides])
    cfg.run_dir = run_dir
    return cfg
