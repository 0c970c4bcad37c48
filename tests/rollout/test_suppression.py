"""Sampling never emits the special tokens the training forward would misread as image placeholders."""

import pytest
import torch
from PIL import Image
from torch import nn

from tests.support import bare_trainer
from vrft.models.policy import LoraSpec, ModelSpec, base_model, load_processor_for
from vrft.modules.grpo import GRPOModule
from vrft.modules.losses import SequenceMeanLoss
from vrft.modules.scoring import WeightedReward
from vrft.precision import VrftPrecision
from vrft.rewards import format_reward
from vrft.rollout.tokens import sanitise_completions, stop_token_ids, suppressed_token_ids

SPEC = ModelSpec(name_or_path="tiny", max_pixels=12544)


@pytest.fixture(scope="module")
def tokenizer():
    return load_processor_for(SPEC).tokenizer


def test_suppressed_set_comes_from_the_tokenizer_and_keeps_the_stop_tokens(tokenizer):
    suppressed = suppressed_token_ids(tokenizer)
    for token in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>"):
        assert tokenizer.convert_tokens_to_ids(token) in suppressed
    assert not set(stop_token_ids(tokenizer)) & set(suppressed)


def test_sanitise_ends_a_completion_at_its_first_suppressed_token():
    pad, image_pad = 0, 9
    ids = torch.tensor([[5, 9, 6, 7], [5, 6, 7, 8], [9, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    clean, clean_mask, found = sanitise_completions(ids, mask, [image_pad], pad)
    assert found == 3
    assert clean.tolist() == [[5, 0, 0, 0], [5, 6, 7, 8], [0, 0, 0, 0]]
    # The replaced token stays in the mask (a stop token now): no completion becomes empty.
    assert clean_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def favour_image_pad(module: GRPOModule, bias: float = 50.0) -> int:
    """Give the policy's lm_head a bias that makes `<|image_pad|>` by far the most likely next token."""
    model = base_model(module.policy)
    image_pad = module.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    old = model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True, device=old.weight.device)
    head.weight = old.weight  # tied to the embeddings in the tiny model: keep it so
    head.bias = nn.Parameter(torch.zeros(old.out_features, device=old.weight.device), requires_grad=False)
    head.bias.data[image_pad] = bias
    model.lm_head = head
    return image_pad


def train_one_step(engine: str, accelerator: str) -> tuple[list, int]:
    """One GRPO optimizer step on a policy that wants to emit `<|image_pad|>`; returns its rollouts."""
    torch.manual_seed(0)
    module = GRPOModule(
        model=SPEC,
        lora=LoraSpec(r=4, alpha=8),
        loss=SequenceMeanLoss(beta=0.04),
        rewards={"format": WeightedReward(format_reward)},
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        group_size=2,
        max_new_tokens=6,
        rollout_batch_size=2,
        prompts_per_step=2,
        update_micro_batch_size=2,
        rollout_engine=engine,
    )
    module.build_policy(torch.float32)
    image_pad = favour_image_pad(module)
    rollouts = []
    rollout = module.rollout
    module.rollout = lambda rows: rollouts.append(rollout(rows)) or rollouts[-1]
    data = [
        {"image": Image.new("RGB", (56, 56), (200, 0, 0)), "problem": "Colour?", "solution": "red"},
        {"image": Image.new("RGB", (56, 84), (0, 0, 200)), "problem": "Colour?", "solution": "blue"},
    ]
    trainer = bare_trainer(accelerator, 1, VrftPrecision())
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=2, collate_fn=list))
    return rollouts, image_pad


def check_no_placeholder(rollouts: list, image_pad: int) -> None:
    assert rollouts, "the training step ran no rollout"
    for rollout in rollouts:
        assert not (rollout.completion_ids == image_pad).any()
        assert rollout.stats["suppressed_tokens"] == 0  # suppressed at sampling, not cut out afterwards
        assert rollout.completion_mask.sum() > 0


@pytest.mark.parametrize("engine", ["hf", "bf16_copy", "dequant"])
def test_every_cpu_engine_trains_a_step_without_sampling_image_pad(engine):
    check_no_placeholder(*train_one_step(engine, "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["hf", "bf16_copy", "dequant"])
def test_every_cuda_engine_trains_a_step_without_sampling_image_pad(engine):
    check_no_placeholder(*train_one_step(engine, "gpu"))
