"""The planner per rank: DDP replicates the model and splits the prompts, FSDP also splits the weights."""

from dataclasses import replace

import pytest
from hydra import compose, initialize_config_dir

from tests.planner.test_estimator import SHAPE
from tests.test_train_cli import CONF
from vrft.planner.estimator import Calibration, WeightFootprint, Workload, estimate
from vrft.planner.planning import _candidates, _with, cards_needed, plan_config

WEIGHTS = WeightFootprint(
    weight_bytes=8_000_000,
    lm_linear_params=1_000_000,
    dequant_params=0,
    adapter_params=100_000,
    fused_lora_a_params=40_000,
    adapter_bytes_per_param=4,
    optimizer_bytes_per_param=8.0,
    optimizer_paged=False,
)
WORK = Workload(
    group_size=4,
    rollout_batch_size=2,
    update_micro_batch_size=4,
    max_new_tokens=32,
    logprob_chunk_size=64,
    image_tokens=16,
    prompt_text_tokens=16,
    rollouts_per_step=4,
)


def test_ddp_rank_holds_the_whole_model_and_its_share_of_the_stored_rollouts():
    one = estimate(SHAPE, WEIGHTS, WORK, Calibration())
    # 4 ranks: one stored rollout each instead of four (what the planning layer passes for devices=4).
    rank = estimate(SHAPE, WEIGHTS, replace(WORK, ranks=4, rollouts_per_step=1), Calibration())
    for name in ("weights", "adapter", "gradients", "optimizer", "kv_cache", "activations"):
        assert rank.components[name] == one.components[name], name
    assert rank.components["stored_rollouts"] < one.components["stored_rollouts"]
    assert "gathered_layer" not in rank.components
    assert any("(ddp)" in note for note in rank.notes)


def test_fsdp_rank_holds_a_quarter_of_the_weights_plus_one_gathered_layer():
    one = estimate(SHAPE, WEIGHTS, WORK, Calibration())
    rank = estimate(SHAPE, WEIGHTS, replace(WORK, ranks=4, shard_weights=True), Calibration())
    assert rank.components["weights"] == 8_000_000 / 4
    assert rank.components["adapter"] == 100_000 * 4 / 4
    # Whole: FSDP's no_sync accumulates unsharded gradients until the step's last micro-batch.
    assert rank.components["gradients"] == one.components["gradients"] == 100_000 * 4
    assert rank.components["optimizer"] == 100_000 * 8 / 4
    assert rank.components["gathered_layer"] == 8_000_000 / SHAPE.layers  # one of 2 decoder layers
    # Each rank still decodes and back-propagates its own sequences: not sharded.
    for name in ("kv_cache", "activations", "logprob_buffers", "stored_rollouts"):
        assert rank.components[name] == one.components[name], name
    # Resident bytes fall by 3/4 of weights + adapter + optimizer, minus the gathered layer.
    saved = 0.75 * (8_000_000 + 400_000 + 800_000) - 4_000_000
    assert one.phases["update"] - rank.phases["update"] == pytest.approx(saved)


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=["warm_start=none", *overrides])


def test_devices_split_the_prompts_in_the_plan():
    one = plan_config(
        _cfg(
            "trainer.accelerator=cpu",
            "algorithm.prompts_per_step=4",
            "algorithm.rollout_batch_size=1",
            "algorithm.update_micro_batch_size=4",
        )
    )
    two = plan_config(
        _cfg(
            "trainer.accelerator=cpu",
            "algorithm.prompts_per_step=4",
            "algorithm.rollout_batch_size=1",
            "algorithm.update_micro_batch_size=4",
            "trainer.devices=2",
            "trainer.strategy=ddp",
        )
    )
    assert two.components["stored_rollouts"] == pytest.approx(one.components["stored_rollouts"] / 2)
    assert two.components["weights"] == one.components["weights"]


def test_cards_needed_counts_the_fewest_cards_that_fit():
    cfg = _cfg("trainer.accelerator=cpu")
    device_gb = plan_config(cfg).device_gb
    # A card just larger than the one-rank plan: one card under either strategy.
    assert cards_needed(cfg, card_gb=device_gb + 0.01) == {"ddp": 1, "fsdp": 1}
    # A card too small for one rank: DDP never fits (every rank holds everything), FSDP fits on none either
    # when even the unsharded part (CUDA context alone) exceeds the card.
    assert cards_needed(cfg, card_gb=0.1, max_cards=4) == {"ddp": None, "fsdp": None}


def test_under_fsdp_the_planner_suggests_and_counts_only_what_fsdp_runs():
    # The changes it tries on bf16 with torch AdamW: under DDP the next precision down (int8) and the paged
    # 8-bit optimizer; under FSDP, which refuses both (and mixed), int4 and no optimizer change.
    ddp = _candidates(_cfg("trainer.accelerator=cpu", "trainer.strategy=ddp", "precision=bf16"))
    fsdp = _candidates(_cfg("trainer.accelerator=cpu", "trainer.strategy=fsdp", "precision=bf16"))
    assert {"precision=int8", "optimizer=paged_adamw8bit"} <= set(ddp)
    assert "precision=int4" in fsdp
    assert not {"precision=int8", "precision=mixed", "optimizer=paged_adamw8bit"} & set(fsdp)
    # The rtx4090 profile's paged 8-bit optimizer: FSDP's count is that of optimizer=adamw, the run it names.
    paged = _cfg("trainer.accelerator=cpu", "+hw=rtx4090")
    adamw = _cfg("trainer.accelerator=cpu", "+hw=rtx4090", "optimizer=adamw")
    one_card = ["trainer.strategy=fsdp", "algorithm.rollout_engine=hf"]
    with_adamw, as_configured = (plan_config(_with(cfg, one_card)).device_gb for cfg in (adamw, paged))
    assert as_configured < with_adamw  # paged 8-bit state is smaller, but FSDP does not run it
    card = (as_configured + with_adamw) / 2
    assert cards_needed(paged, card_gb=card, max_cards=1)["fsdp"] is None
    assert cards_needed(adamw, card_gb=with_adamw + 0.01, max_cards=1)["fsdp"] == 1
