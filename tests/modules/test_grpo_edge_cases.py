"""One GRPO step on groups a policy can sample but a careless step mishandles: empty completions (EOS first),
a whole group identical, every reward equal, completions cut at `max_new_tokens`. Whatever the group, the
step runs and every logged metric is finite.

Only `GRPOModule.generate` is replaced (fixed completion tokens, no sampling); scoring, the loss, backward and
the optimizer step are the training code, run by a Lightning `Trainer` for one optimizer step.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.utils.data import DataLoader

from tests.support import bare_trainer
from vrft.models.policy import LoraSpec, ModelSpec
from vrft.modules.grpo import GRPOModule
from vrft.modules.losses import ConstantNormLoss, SequenceMeanLoss, TokenMeanLoss
from vrft.modules.scoring import WeightedReward
from vrft.precision import VrftPrecision
from vrft.rollout.batch import Rollout, build_prompts, completion_mask
from vrft.rollout.tokens import stop_token_ids

ROW = {
    "image": Image.new("RGB", (56, 56), (200, 0, 0)),
    "problem": "What colour?",
    "solution": "<answer>red</answer>",
}
MAX_NEW_TOKENS = 4


def one_step(
    completion_ids: list[list[int]], rewards: list[float], tmp_path, max_steps: int | None = None, **settings
) -> tuple[Rollout, dict]:
    """Train one policy update on one group of fixed completion tokens scored `rewards`; the rollout (as scoring
    left it) and the logged metrics (`trainer.callback_metrics`; the CSV rows are in `logged_rows(tmp_path)`)."""
    torch.manual_seed(0)
    loss = settings.pop("loss", SequenceMeanLoss(beta=0.04))
    module = GRPOModule(
        model=ModelSpec(name_or_path="tiny", max_pixels=12544),
        lora=LoraSpec(r=4, alpha=8),
        loss=loss,
        rewards={"fixed": WeightedReward(lambda completions, solutions, **columns: list(rewards))},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        group_size=len(completion_ids),
        max_new_tokens=MAX_NEW_TOKENS,
        rollout_batch_size=1,
        prompts_per_step=1,
        update_micro_batch_size=len(completion_ids),
        **settings,
    )
    module.build_policy(torch.float32)
    tokenizer = module.processor.tokenizer
    length = max(map(len, completion_ids))
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (length - len(row)) for row in completion_ids])
    rollout = Rollout(
        prompts=build_prompts(module.processor, [ROW], module.prompt_template, module.device),
        group_size=len(completion_ids),
        completion_ids=ids,
        completion_mask=completion_mask(ids, stop_token_ids(tokenizer)),
        completions=tokenizer.batch_decode(ids, skip_special_tokens=True),
        rows=[ROW],
    )
    module.generate = lambda *args, **kwargs: rollout
    max_steps = max_steps or module.settings.num_iterations  # one update
    trainer = bare_trainer("cpu", max_steps, VrftPrecision(), default_root_dir=tmp_path)
    trainer.loggers = [CSVLogger(tmp_path, name="logs", version="")]
    trainer.fit(module, train_dataloaders=DataLoader([ROW], batch_size=1, collate_fn=list))
    assert trainer.global_step == max_steps
    return rollout, {key: float(value) for key, value in trainer.callback_metrics.items()}


def logged_rows(tmp_path) -> list[dict]:
    """The rows `one_step` logged to its CSV logger, one per policy update."""
    with (tmp_path / "logs" / "metrics.csv").open() as file:
        return list(csv.DictReader(file))


def assert_finite(metrics: dict) -> None:
    logged = {key: value for key, value in metrics.items() if key.startswith(("train/", "rollout/"))}
    assert logged and all(math.isfinite(value) for value in logged.values()), logged


@pytest.mark.parametrize(
    ("loss", "scale_rewards"),
    [(SequenceMeanLoss(), True), (TokenMeanLoss(), False), (ConstantNormLoss(), True)],
    ids=["visual_rft", "dapo-unscaled", "dr_grpo"],
)
def test_a_group_of_identical_empty_completions_trains_a_zero_step(loss, scale_rewards, tmp_path):
    eos = 151645  # <|im_end|> as the first token: each completion is empty text, one masked token long
    _, metrics = one_step([[eos]] * 3, [1.0] * 3, tmp_path, loss=loss, scale_rewards=scale_rewards)
    assert_finite(metrics)
    # Every advantage is 0 (std 0 divided by std + eps, or not divided) and a fresh adapter is its reference
    # (KL and its gradient exactly 0): the loss is exactly 0, not NaN.
    assert metrics["train/loss"] == 0.0 and metrics["train/kl"] == 0.0
    assert [float(row["train/kl"]) for row in logged_rows(tmp_path)] == [0.0]  # measured: beta=0.04
    assert metrics["train/advantage_std"] == 0.0 and metrics["train/zero_std_groups"] == 1.0
    assert metrics["train/completion_length"] == 1.0 and metrics["train/truncated_fraction"] == 0.0


def test_cut_completions_and_a_stale_rollout_without_reference_log_finite_metrics(tmp_path):
    # Two completions cut at max_new_tokens (no EOS), one ending exactly at the limit, one empty; rewards
    # spread. num_iterations=2 reuses the rollout (its stored log-probs are stale by the second step);
    # loss.beta=0 skips the reference forward.
    eos = 151645
    group = [[100, 101, 102, 103], [300, 301, 302, 303], [200, 201, 202, eos], [eos]]
    rollout, metrics = one_step(
        group, [1.0, 0.0, 0.5, 0.0], tmp_path, loss=SequenceMeanLoss(beta=0.0), num_iterations=2
    )
    assert_finite(metrics)
    assert metrics["train/truncated_fraction"] == 0.5
    assert metrics["train/completion_length"] == (4 + 4 + 4 + 1) / 4
    assert rollout.ref_logprobs is None and rollout.old_logprobs is not None
    # beta=0: no reference log-probs, so no KL is measured and none is logged (a 0 would claim a measurement).
    assert "train/kl" not in metrics
    rows = logged_rows(tmp_path)
    assert rows and all("train/kl" not in row for row in rows)


def test_the_last_update_stops_at_max_steps(tmp_path):
    # num_iterations=3 in a 2-step run: the update stops after its second optimizer step. It took all three
    # (global_step 3 of max_steps 2), past the run's LR schedule and step count.
    eos = 151645
    _, metrics = one_step(
        [[100, eos], [300, 301, eos], [200, eos]], [1.0, 0.0, 0.5], tmp_path, max_steps=2, num_iterations=3
    )  # one_step asserts global_step == max_steps
    assert_finite(metrics)
