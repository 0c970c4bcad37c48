"""Shared pieces of the evaluation tests: Visual-RFT-schema datasets, a local model folder, a stub decoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import torch
from hydra import compose, initialize_config_dir
from peft import get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText

from vrft.data.prompts import classification_prompt, detection_prompt, grounding_prompt
from vrft.models.policy import LoraSpec
from vrft.models.presets import tiny_checkpoint

ROOT = Path(__file__).parents[2]
CONF = str(ROOT / "conf")
SIZE = 56  # the smallest image the tiny model's processor takes (min_pixels 3136 = 56 x 56)
CAT = "<answer>[{'Position': [100, 100, 500, 500], 'Confidence': 1}]</answer>"
NONE = "<answer>No Objects</answer>"


def image(color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), color)


def schema_rows(task: str) -> list[dict]:
    """Rows with only `image`, `problem`, `solution`, as Visual-RFT publishes them."""
    red, blue = image((200, 30, 30)), image((30, 30, 200))
    if task == "detection":
        # Two images, each asked about two categories: "dog" is absent from both.
        return [
            {"image": red, "problem": detection_prompt("cat"), "solution": CAT},
            {"image": red, "problem": detection_prompt("dog"), "solution": NONE},
            {
                "image": blue,
                "problem": detection_prompt("cat"),
                "solution": CAT.replace("500, 500", "600, 700"),
            },
            {"image": blue, "problem": detection_prompt("dog"), "solution": NONE},
        ]
    if task == "classification":
        prompt = classification_prompt()
        return [
            {"image": c, "problem": prompt, "solution": f"<answer>{n}</answer>"}
            for c, n in ((red, "rose"), (blue, "tulip"))
        ]
    return [
        {
            "image": red,
            "problem": grounding_prompt("the red square"),
            "solution": "<answer>(0,0),(1000,1000)</answer>",
        },
        {
            "image": blue,
            "problem": grounding_prompt("the blue square"),
            "solution": "<answer>(100,100),(900,900)</answer>",
        },
    ]


def write_dataset(rows: list[dict], folder: Path, layout: str, split: str = "test") -> Path:
    """`rows` as a `save_to_disk` folder or as a parquet shard named like the Hub's (`data/test-...`)."""
    features = datasets.Features(
        {"image": datasets.Image(), "problem": datasets.Value("string"), "solution": datasets.Value("string")}
    )
    table = datasets.Dataset.from_list(rows, features=features)
    if layout == "disk":
        datasets.DatasetDict({split: table}).save_to_disk(str(folder))
        return folder
    (folder / "data").mkdir(parents=True)
    table.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def local_model(folder: Path) -> Path:
    """The tiny preset saved as a local checkpoint folder (what `model=local` loads)."""
    shutil.copytree(tiny_checkpoint(), folder)
    (folder / "vrft_preset.json").unlink()
    return folder


def random_adapter(folder: Path, seed: int = 1) -> Path:
    """A peft adapter for the tiny model with random (non-zero) LoRA weights: it changes the model."""
    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint(), dtype=torch.float32)
    model = get_peft_model(base, LoraSpec(r=4, alpha=8).peft_config())
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    model.save_pretrained(str(folder))
    return folder


def eval_config(run_dir: Path, *overrides: str):
    """The composed `vrft.evaluate` config with `run_dir` set (what the CLI builds)."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("evaluate", overrides=["max_new_tokens=4", *overrides])
    cfg.run_dir = str(run_dir)
    return cfg


class Interrupted(RuntimeError):
    """What the stub raises where a real run would be killed."""


class StubDecoder:
    """Stands in for `generate_rollout` in validation: answers with `answer(row, adapted)`, counts rows.

    `adapted` is True when the policy was loaded from an adapter (it then holds the frozen reference copy).
    `fail_after` raises after that many batches, as an interrupted run would stop.
    """

    def __init__(self, answer, fail_after: int | None = None):
        self.answer = answer
        self.fail_after = fail_after
        self.rows: list[int] = []
        self.batches = 0

    def __call__(self, policy, processor, rows, *args, **kwargs):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise Interrupted(f"stopped after {self.batches} batches")
        self.batches += 1
        self.rows += [row["row_index"] for row in rows]
        adapted = "reference" in getattr(policy, "peft_config", {})
        return SimpleNamespace(completions=[f"<think>x</think>{self.answer(row, adapted)}" for row in rows])


def install(monkeypatch, decoder: StubDecoder) -> StubDecoder:
    monkeypatch.setattr("vrft.modules.policy_module.generate_rollout", decoder)
    return decoder


def read_predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
