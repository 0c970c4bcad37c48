"""SFT on the tiny model: the target text, prompt masking, and a loss that falls on a fixed batch."""

import pytest
import torch
from PIL import Image

from vrft.models.policy import LANGUAGE_MODEL_TARGETS, LoraSpec, ModelSpec
from vrft.modules.sft import SFTModule, sft_target, target_batch


def rows():
    return [
        {
            "image": Image.new("RGB", (56, 56), (220, 40, 40)),
            "problem": "What colour?",
            "solution": "<answer>red</answer>",
            "category": "red",
        },
        {
            "image": Image.new("RGB", (112, 84), (40, 80, 220)),
            "problem": "Which colour is it?",
            "solution": "<answer>blue</answer>",
            "category": "blue",
        },
    ]


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    sft = SFTModule(
        model=ModelSpec(name_or_path="tiny", max_pixels=12544),
        # lm_head too: the tiny model's frozen tied embeddings alone cannot put probability on a target.
        lora=LoraSpec(r=4, alpha=8, target_modules=f"({LANGUAGE_MODEL_TARGETS})|lm_head"),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    sft.build_policy(torch.float32)
    return sft


def test_target_wraps_the_answer_in_a_reasoning_span():
    row = rows()[0]
    assert sft_target(row, "The image shows a {answer}.") == (
        "<think>The image shows a red.</think><answer>red</answer>"
    )
    assert sft_target(row, "It is {category}.") == "<think>It is red.</think><answer>red</answer>"
    assert sft_target(row, None) == "<answer>red</answer>"


def test_target_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="names column 'colour'"):
        sft_target(rows()[0], "{colour}")
    with pytest.raises(ValueError, match="no <answer>"):
        sft_target({"solution": "red"}, "{answer}")


def test_only_target_tokens_are_labels(module):
    batch = target_batch(
        module.processor, rows(), ["<answer>red</answer>", "<answer>x</answer>"], "{problem}", "cpu"
    )
    tokenizer = module.processor.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, text in enumerate(["<answer>red</answer>", "<answer>x</answer>"]):
        ids = batch.completion_ids[i][batch.completion_mask[i].bool()].tolist()
        assert ids[-1] == end  # the model learns to stop
        assert tokenizer.decode(ids[:-1]) == text
    # The prompt ends with the assistant header: the targets start right after it.
    assert tokenizer.decode(batch.prompts.input_ids[0][-3:]).endswith("assistant\n")
    assert batch.completion_mask[1].sum() < batch.completion_mask[0].sum()


def train_on_fixed_batch(sft: SFTModule, steps: int, lr: float) -> tuple[list[float], dict]:
    """`steps` AdamW steps on `rows()`; the loss of each step and the last step's statistics."""
    optimizer = torch.optim.AdamW([p for p in sft.policy.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss, stats = sft.sft_loss(rows())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses, stats


def test_loss_falls_on_a_fixed_batch(module):
    losses, stats = train_on_fixed_batch(module, steps=6, lr=1e-2)
    assert stats["train/target_tokens"] > 0
    assert losses[-1] < losses[0] - 1.0, losses


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="algorithm.batch_size=0"):
        SFTModule(ModelSpec(name_or_path="tiny"), LoraSpec(), optimizer=None, batch_size=0)


def test_full_fine_tuning_trains_the_projections_themselves():
    torch.manual_seed(0)
    full = SFTModule(
        model=ModelSpec(name_or_path="tiny", max_pixels=12544),
        lora=LoraSpec(full=True),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    full.build_policy(torch.float32)
    trainable = {n for n, p in full.policy.named_parameters() if p.requires_grad}
    assert trainable and all("language_model" in n and "proj" in n for n in trainable)
    assert not any("lora_" in n for n, _ in full.policy.named_parameters())
    before = {n: p.detach().clone() for n, p in full.policy.named_parameters()}
    losses, _ = train_on_fixed_batch(full, steps=4, lr=1e-3)
    assert losses[-1] < losses[0]
    after = dict(full.policy.named_parameters())
    assert all(not torch.equal(after[n], before[n]) for n in trainable)
    assert all(torch.equal(after[n], before[n]) for n in before if n not in trainable)


def test_full_fine_tuning_is_refused_where_it_cannot_work():
    from vrft.modules.grpo import GRPOModule
    from vrft.precision import Int8Precision

    with pytest.raises(ValueError, match="lora.full=true has no adapter"):
        GRPOModule(ModelSpec(name_or_path="tiny"), LoraSpec(full=True), loss=None, rewards={}, optimizer=None)
    with pytest.raises(ValueError, match="cannot start from lora.init_adapter"):
        SFTModule(
            ModelSpec(name_or_path="tiny"), LoraSpec(full=True, init_adapter="/a"), optimizer=None
        ).build_policy()
    full = SFTModule(ModelSpec(name_or_path="tiny"), LoraSpec(full=True), optimizer=None)
    full.build_policy(torch.float32)
    with pytest.raises(ValueError, match="quantised weights cannot train"):
        Int8Precision().convert_module(full.policy)
