"""The GRPO module's stages on the tiny model: rollout shapes, reference KL, settings validation."""

import pytest
import torch
from PIL import Image

from vrft.models.policy import LoraSpec, ModelSpec
from vrft.modules.grpo import GRPOModule, GRPOSettings
from vrft.modules.losses import SequenceMeanLoss, k3_kl
from vrft.modules.scoring import RewardSet, WeightedReward
from vrft.modules.step_metrics import step_metrics, step_totals
from vrft.rewards import AccuracyReward, format_reward
from vrft.rollout.batch import Rollout, build_prompts, completion_mask
from vrft.rollout.tokens import stop_token_ids


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    grpo = GRPOModule(
        model=ModelSpec(name_or_path="tiny", max_pixels=12544),
        lora=LoraSpec(r=4, alpha=8),
        loss=SequenceMeanLoss(beta=0.04),
        rewards={"format": WeightedReward(format_reward), "accuracy": WeightedReward(AccuracyReward())},
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        group_size=3,
        max_new_tokens=6,
        rollout_batch_size=2,
        prompts_per_step=2,
        update_micro_batch_size=2,
    )
    grpo.build_policy(torch.float32)
    return grpo


def rows():
    return [
        {
            "image": Image.new("RGB", (56, 84), (255, 0, 0)),
            "problem": "What colour?",
            "solution": "<answer>red</answer>",
        },
        {
            "image": Image.new("RGB", (112, 112), (0, 0, 255)),
            "problem": "Colour?",
            "solution": "<answer>blue</answer>",
        },
    ]


def test_rollout_has_group_size_completions_per_prompt(module):
    rollout = module.rollout(rows())
    assert rollout.completion_ids.shape[0] == 6
    assert rollout.completion_ids.shape[1] <= 6
    assert len(rollout.completions) == 6
    assert rollout.completion_mask[:, 0].eq(1).all()
    inputs = rollout.sequence_inputs(2, 4)
    # completions 2 and 3 belong to prompts 0 and 1: both images, each patch grid once.
    assert inputs["image_grid_thw"].shape == (2, 3)
    assert inputs["pixel_values"].shape[0] == int(inputs["image_grid_thw"].prod(-1).sum())


def test_repeated_prompts_keep_each_image_with_its_prompt(module):
    from vrft.rollout.batch import build_prompts

    prompts = build_prompts(module.processor, rows(), "{problem}", "cpu")
    repeated = prompts.repeated(3)
    assert repeated.input_ids.shape[0] == 6
    assert torch.equal(repeated.input_ids[3], prompts.input_ids[1])
    assert repeated.patch_counts == [prompts.patch_counts[0]] * 3 + [prompts.patch_counts[1]] * 3
    chunks = torch.split(repeated.pixel_values, repeated.patch_counts)
    first, second = torch.split(prompts.pixel_values, prompts.patch_counts)
    assert all(torch.equal(c, first) for c in chunks[:3]) and all(torch.equal(c, second) for c in chunks[3:])


def test_reference_kl_is_exactly_zero_with_fresh_adapter(module):
    # peft initialises lora_B to zero: the adapter-disabled reference equals the policy exactly.
    rollout = module.rollout(rows())
    module.score(rollout)
    with torch.no_grad():
        logprobs = module.rollout_logprobs(rollout)
    assert torch.equal(rollout.ref_logprobs, logprobs)
    assert torch.count_nonzero(k3_kl(logprobs, rollout.ref_logprobs)) == 0
    assert rollout.advantages.shape == (6,)


def test_disabled_adapter_gives_base_model_logprobs(module):
    rollout = module.rollout(rows())
    with torch.no_grad():
        before = module.rollout_logprobs(rollout)
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
        changed = module.rollout_logprobs(rollout)
        with module.policy.disable_adapter():
            reference = module.rollout_logprobs(rollout)
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.sub_(0.05)
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(reference, before)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"group_size": 1}, "group_size=1"),
        ({"prompts_per_step": 3, "rollout_batch_size": 2}, "prompts_per_step=3"),
        (
            {"group_size": 3, "rollout_batch_size": 1, "update_micro_batch_size": 2},
            "update_micro_batch_size=2",
        ),
        ({"num_iterations": 0}, "num_iterations=0"),
        # Measured: temperature=0 divided the log-probs by zero and trained on NaN from step 1.
        ({"temperature": 0.0}, "algorithm.temperature=0.0.*set algorithm.temperature>0"),
        ({"max_bad_steps": 0}, "algorithm.max_bad_steps=0 must be >= 1"),
        (
            {"min_new_tokens": 8, "max_new_tokens": 4},
            "min_new_tokens=8 must be between 0 and algorithm.max_new_tokens=4; lower min_new_tokens",
        ),
        # Measured: generate took -1 silently, as 0; a negative minimum is a typo, not a setting.
        ({"min_new_tokens": -1}, "min_new_tokens=-1 must be between 0 and"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        GRPOSettings(**settings)


def test_truncated_fraction_counts_completions_without_a_stop_token(module, monkeypatch):
    # max_new_tokens=6. A completion whose <|im_end|> is its 6th token ended on its own: it is as long as one
    # cut at the limit, which the old count (length >= max_new_tokens) also called truncated.
    tokenizer = module.processor.tokenizer
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    completion_ids = torch.tensor(
        [
            [100, 101, 102, 103, 104, eos],  # ends at the limit
            [100, 101, 102, 103, 104, 105],  # cut at the limit
            [eos, pad, pad, pad, pad, pad],  # empty: EOS first
            [200, eos, pad, pad, pad, pad],
            [100, 101, 102, 103, 104, 105],  # cut at the limit
            [300, 301, 302, 303, 304, pad],  # <|endoftext|> (Qwen2's pad) is a stop token too
        ]
    )
    fixed = fixed_rollout(module, completion_ids)
    monkeypatch.setattr(module, "generate", lambda *args, **kwargs: fixed)
    stats = module.rollout(rows()).stats
    assert stats["truncated_count"] == 2.0
    assert stats["completion_length_max"] == 6.0


def fixed_rollout(module, completion_ids: torch.Tensor) -> Rollout:
    """`completion_ids` `[6, C]` as the rollout of `rows()`, three completions per prompt, as `generate` returns it."""
    tokenizer = module.processor.tokenizer
    return Rollout(
        prompts=build_prompts(module.processor, rows(), module.prompt_template, module.device),
        group_size=3,
        completion_ids=completion_ids,
        completion_mask=completion_mask(completion_ids, stop_token_ids(tokenizer)),
        completions=tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        rows=rows(),
    )


def test_groups_of_equal_rewards_score_zero_advantages_and_count_as_flat(module, monkeypatch):
    # Every completion scores 0.9 (e.g. a detection IoU 0.5 + confidence 0.4): no group has a spread. The old
    # float32 mean of three 0.9s is not 0.9, and its residues over std + eps were advantages of 6e-4.
    constant = RewardSet({"constant": WeightedReward(lambda c, s, **k: [0.9] * len(c))})
    monkeypatch.setattr(module, "rewards", constant)
    rollout = fixed_rollout(module, torch.tensor([[100, 101], [102, 103], [104, 105]] * 2))
    module.score(rollout)
    assert torch.equal(rollout.advantages, torch.zeros(6))
    assert rollout.stats["group_zero_std_count"] == 2.0 and rollout.stats["advantage_sq_sum"] == 0.0


def test_reward_std_of_equal_rewards_is_zero(module, monkeypatch):
    # train/reward_std is sqrt(E[r^2] - E[r]^2) over the step; with float32 sums it logged 1e-3 for six rewards
    # of 2.1702408 (measured), a spread that was not there.
    constant = RewardSet({"constant": WeightedReward(lambda c, s, **k: [2.1702408467537326] * len(c))})
    monkeypatch.setattr(module, "rewards", constant)
    fixed = fixed_rollout(module, torch.tensor([[100, 101], [102, 103], [104, 105]] * 2))
    monkeypatch.setattr(module, "generate", lambda *args, **kwargs: fixed)
    rollout = module.rollout(rows())
    module.score(rollout)
    sums, peaks = step_totals([rollout], 0.0, {}, {"update_seconds": 0.0, "update_peak_gb": 0.0})
    metrics = step_metrics(sums, peaks, group_size=3, world_size=1, reward_names=["constant"])
    assert metrics["train/reward_std"] == 0.0
    assert metrics["train/reward"] == pytest.approx(2.1702408467537326, rel=1e-7)  # float32's resolution
