"""A row whose prompt, with the completion budget after it, runs past the model's context is a bad row of the
data module, refused at setup before the model loads (`vrft.data.prompt_length`)."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
from PIL import Image

import vrft.cli  # noqa: F401  (registers the config's resolvers, as the CLI does)
import vrft.modules.policy_module
from tests.support import train_config as config
from vrft.data.loading import load_visual_rft
from vrft.data.prompt_length import PromptBudget, length_faults
from vrft.models.presets import build_processor, tiny_checkpoint
from vrft.setup import build_run

SHORT = "What colour is the square?"
LONG = SHORT + " Answer in one word, and think about it first." * 4
NEW_TOKENS = 16  # algorithm.max_new_tokens of these runs
IMAGE_SIZE = (112, 84)


class ModelLoaded(Exception):
    """Raised in place of loading the model: the run got past its data checks."""


@functools.cache
def tiny_processor():
    return build_processor(3136, 12544)  # the tiny preset's image budget (model/tiny.yaml)


def processed_length(problem: str) -> int:
    """Tokens of a row's prompt as the rollout builds it: the processor's own output, image included."""
    processor = tiny_processor()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": problem}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = processor(text=[text], images=[Image.new("RGB", IMAGE_SIZE)], return_tensors="pt")
    return encoded["input_ids"].shape[1]


@pytest.fixture
def short_context_model(tmp_path):
    """The tiny model with a context that fits the SHORT prompt and its completion exactly, and no more."""
    folder = tmp_path / "model"
    folder.mkdir()
    for file in tiny_checkpoint().iterdir():  # weights linked, not copied: the run stops before they load
        if file.suffix == ".safetensors":
            (folder / file.name).symlink_to(file)
        else:
            shutil.copy(file, folder / file.name)
    raw = json.loads((folder / "config.json").read_text())
    raw["text_config"]["max_position_embeddings"] = processed_length(SHORT) + NEW_TOKENS
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def write_rows(folder, problems: list[str]):
    """A JSONL dataset, one image file per row, so that errors can name the image."""
    folder.mkdir()
    lines = []
    for index, problem in enumerate(problems):
        Image.new("RGB", IMAGE_SIZE, (200, 30, 30)).save(folder / f"{index}.png")
        lines.append(
            json.dumps({"image": f"{index}.png", "problem": problem, "solution": "<answer>red</answer>"})
        )
    (folder / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "rows.jsonl"


def run_config(tmp_path, model, data, *overrides):
    return config(
        "task=classification",
        "data=disk",
        f"data.path={data}",
        f"model.name_or_path={model}",
        f"algorithm.max_new_tokens={NEW_TOKENS}",
        "data.num_workers=0",
        f"run_dir={tmp_path / 'run'}",
        *overrides,
    )


def fit_until_the_model_loads(cfg, monkeypatch):
    def loaded(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(vrft.modules.policy_module, "load_base_model", loaded)
    run = build_run(cfg, logger=False)
    run.trainer.fit(run.module, datamodule=run.datamodule)


def test_a_prompt_past_the_context_is_refused_before_the_model_loads(
    tmp_path, short_context_model, monkeypatch
):
    data = write_rows(tmp_path / "data", [SHORT, LONG, SHORT, SHORT, SHORT])
    cfg = run_config(tmp_path, short_context_model, data)
    with pytest.raises(ValueError) as raised:
        fit_until_the_model_loads(cfg, monkeypatch)
    message = str(raised.value)
    context = processed_length(SHORT) + NEW_TOKENS
    long = processed_length(LONG)
    assert message.startswith(
        f"1 bad row(s) in split 'train': row 1: the prompt with image '{data.parent / '1.png'}'"
    )
    assert f"is {long} tokens (" in message  # the count the processor would make, without running it
    assert (
        f"and algorithm.max_new_tokens={NEW_TOKENS} more after it: {long + NEW_TOKENS} positions" in message
    )
    assert f"past the model's context of {context} (max_position_embeddings)" in message
    assert (
        "lower model.max_pixels (now 12544), shorten the prompt, or lower algorithm.max_new_tokens" in message
    )


def test_a_prompt_that_just_fits_is_kept(tmp_path, short_context_model, monkeypatch):
    data = write_rows(tmp_path / "data", [SHORT] * 4)
    cfg = run_config(tmp_path, short_context_model, data)
    with pytest.raises(ModelLoaded):  # past the row checks: the prompt and its completion fill the context
        fit_until_the_model_loads(cfg, monkeypatch)


def test_skipped_under_on_bad_row_skip(tmp_path, short_context_model):
    data = write_rows(tmp_path / "data", [SHORT, LONG, SHORT, SHORT, SHORT])
    cfg = run_config(tmp_path, short_context_model, data, "data.on_bad_row=skip")
    run = build_run(cfg, logger=False)
    run.datamodule.setup("fit")
    assert run.datamodule.splits["train"].indices == [0, 2, 3, 4]
    assert run.datamodule.skipped_rows == {"train": 1}
    assert run.module.processor is not None  # loaded once for the check, kept for the run


def test_validation_rows_count_the_decoding_budget(tmp_path):
    data = write_rows(tmp_path / "data", [SHORT])
    table = load_visual_rft(data)["train"]
    prompt = processed_length(SHORT)
    budget = PromptBudget(
        processor=tiny_processor(),
        prompt_template="{problem}",
        context=prompt + 10,
        completions={"train": (10, "algorithm.max_new_tokens"), "val": (11, "algorithm.eval_max_new_tokens")},
        max_pixels=12544,
    )
    assert length_faults(table, [0], budget, "train", {}) == {}
    fault = length_faults(table, [0], budget, "val", {})[0]
    assert f"and algorithm.eval_max_new_tokens=11 more after it: {prompt + 11} positions" in fault
    assert "or lower algorithm.eval_max_new_tokens" in fault
