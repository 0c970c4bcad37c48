"""One real GRPO optimizer step moves the policy towards reward: a guard against an update that does nothing.

The group is four fixed completions of one prompt (no sampling), scored by a fixed reward table. Only
`GRPOModule.generate` is replaced; scoring, advantages, the loss, backward, clipping and the optimizer step
are the training code itself, run by a Lightning `Trainer` for one step.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from tests.support import bare_trainer
from vrft.models.policy import LoraSpec, ModelSpec
from vrft.modules.grpo import GRPOModule
from vrft.modules.losses import SequenceMeanLoss
from vrft.modules.scoring import WeightedReward
from vrft.precision import VrftPrecision
from vrft.rollout.batch import Rollout, build_prompts, completion_mask
from vrft.rollout.tokens import stop_token_ids

ROW = {"image": Image.new("RGB", (56, 56), (200, 0, 0)), "problem": "What colour?", "solution": "red"}
# One group (G = 4) whose completions share no token but the EOS: a token shared by a rewarded and an
# unrewarded completion is pushed both ways, and a correct step can then lower a rewarded completion
# (measured: "It is red." fell by 0.008 nats while "It is green." fell by 0.058).
COMPLETIONS = ["red", "a red square", "blue", "green star"]
RIGHT = {"red": 1.0, "a red square": 1.0, "blue": 0.0, "green star": 0.0}
ALL_EQUAL = dict.fromkeys(COMPLETIONS, 1.0)

# Measured change of each sequence log-prob after the step: +0.071 / +0.185 nats for the rewarded and
# -0.065 / -0.159 for the unrewarded completions. MIN_CHANGE is 6x below the smallest of them and far above
# float32 rounding of these 24-48 nat sequence log-probs (~1e-5). SGD at lr 0.1 keeps the step first-order
# (lr 0.01 moves every completion by a tenth as much): the signs are the gradient's, not an overshoot's.
MIN_CHANGE = 1e-2


def table_reward(table: dict[str, float]):
    """A reward function returning `table[completion]`: fixed rewards for the fixed completions."""

    def reward(completions: list[str], solutions: list[str], **columns) -> list[float]:
        return [table[completion] for completion in completions]

    return reward


def fixed_rollout(module: GRPOModule) -> Rollout:
    """`COMPLETIONS` as the group of `ROW`'s prompt, each ending in `<|im_end|>` and right-padded, as
    `generate` returns them."""
    tokenizer = module.processor.tokenizer
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    ids = [tokenizer.encode(text) + [eos] for text in COMPLETIONS]
    length = max(map(len, ids))
    completion_ids = torch.tensor([row + [pad] * (length - len(row)) for row in ids])  # [G, C]
    return Rollout(
        prompts=build_prompts(module.processor, [ROW], module.prompt_template, module.device),
        group_size=len(COMPLETIONS),
        completion_ids=completion_ids,
        completion_mask=completion_mask(completion_ids, stop_token_ids(tokenizer)),
        completions=list(COMPLETIONS),
        rows=[ROW],
    )


def sequence_logprobs(module: GRPOModule, rollout: Rollout) -> Tensor:
    """`[G]` log-probability of each whole completion (its masked tokens summed) under the current policy."""
    module.policy.eval()
    with torch.no_grad():
        token_logprobs = module.rollout_logprobs(rollout)
    return (token_logprobs * rollout.completion_mask).sum(1)


def logprob_change_after_one_step(rewards: dict[str, float], tmp_path) -> Tensor:
    """`[G]` change of each completion's sequence log-prob after one GRPO optimizer step that scores the
    fixed group with `rewards`."""
    torch.manual_seed(0)
    module = GRPOModule(
        model=ModelSpec(name_or_path="tiny", max_pixels=12544),
        lora=LoraSpec(r=4, alpha=8),  # dropout 0 (the default): the same forward before and after
        # The Visual-RFT KL weight. It cannot move the policy on this step: a fresh adapter (lora_B = 0) is
        # exactly the reference, where the k3 term's gradient, 1 - exp(ref - logp), is exactly 0.
        loss=SequenceMeanLoss(beta=0.04),
        rewards={"table": WeightedReward(table_reward(rewards))},
        # SGD moves the weights by lr x gradient, so the change measured is the GRPO gradient's. Adam's first
        # step is ~lr x sign(gradient): it would make a full-size step from a vanishing gradient.
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        group_size=len(COMPLETIONS),
        max_new_tokens=8,
        rollout_batch_size=1,
        prompts_per_step=1,
        update_micro_batch_size=2,  # two micro-batches: the accumulation path runs too
    )
    module.build_policy(torch.float32)
    rollout = fixed_rollout(module)
    module.generate = lambda *args, **kwargs: rollout  # the one stage replaced: sampling
    before = sequence_logprobs(module, rollout)
    trainer = bare_trainer("cpu", 1, VrftPrecision(), default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader([ROW], batch_size=1, collate_fn=list))
    assert trainer.global_step == 1
    return sequence_logprobs(module, rollout) - before


def test_one_grpo_step_raises_rewarded_and_lowers_unrewarded_completions(tmp_path):
    change = logprob_change_after_one_step(RIGHT, tmp_path)
    rewarded = torch.tensor([RIGHT[text] == 1.0 for text in COMPLETIONS])
    assert (change[rewarded] > MIN_CHANGE).all(), change
    assert (change[~rewarded] < -MIN_CHANGE).all(), change


def test_equal_rewards_leave_the_policy_where_it_was(tmp_path):
    # Every advantage is 0 and the KL gradient is 0 on this step (see above): the gradient is exactly 0, and
    # so is the change (measured: 0.0 for every completion). 1e-5 only allows for float32 rounding; it is
    # 6,000x below the smallest change a rewarded step makes.
    change = logprob_change_after_one_step(ALL_EQUAL, tmp_path)
    assert change.abs().max() < 1e-5, change
