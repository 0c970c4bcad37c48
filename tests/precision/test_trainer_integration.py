"""The plugins inside a real `lightning.Trainer`: manual optimization, loss scaling, clipping, checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from tiny_lora import lora_model, lora_parameters, token_batch
from torch.utils.data import DataLoader

from tests.support import bare_trainer
from vrft.precision import (
    Bf16Precision,
    Fp16Precision,
    Fp32Precision,
    Int4Precision,
    Int8Precision,
    VrftPrecision,
)


class TinyPolicyModule(L.LightningModule):
    """Manual optimization as in GRPO: generate with the policy, then one LoRA update per batch.

    Args:
        clip_val: clip the gradient norm with `LightningModule.clip_gradients` before stepping.
        inject_inf_at: batch index whose first adapter gradient is overwritten with inf.
        inject_nan_loss_at: batch index whose loss is made NaN before backward.
        optimizer: `adamw` or `adamw8bit` (bitsandbytes, 8-bit state from 16 elements on).
    """

    def __init__(
        self,
        clip_val: float | None = None,
        inject_inf_at: int | None = None,
        optimizer: str = "adamw",
        inject_nan_loss_at: int | None = None,
    ):
        super().__init__()
        self.inject_nan_loss_at = inject_nan_loss_at
        self.automatic_optimization = False
        self.clip_val = clip_val
        self.inject_inf_at = inject_inf_at
        self.optimizer_name = optimizer
        self.policy = None
        self.steps: list[dict] = []  # per training step: whether the adapter moved, skipped steps so far
        self.grad_norms: list[float] = []  # as on_before_optimizer_step sees them
        self.at_train_start: dict = {}

    def configure_model(self):
        if self.policy is None:
            self.policy = lora_model(self.trainer.precision_plugin.load_dtype)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.optimizer_name == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=1e-2, min_8bit_size=16)
        return torch.optim.AdamW(params, lr=1e-2)

    def train_dataloader(self):
        return DataLoader([token_batch(1, 8, seed=i)[0] for i in range(8)], batch_size=2)

    def on_train_start(self):
        plugin = self.trainer.precision_plugin
        self.at_train_start = {
            "adapter": lora_parameters(self),
            "skipped_steps": plugin.skipped_steps,
            "scale": plugin.scaler.get_scale() if plugin.scaler is not None else None,
        }

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        self.policy.eval()
        with torch.no_grad():
            prompt = batch[:, :4]
            self.policy.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False
            )
        self.policy.train()
        loss = self.policy(input_ids=batch, labels=batch).loss
        if batch_idx == self.inject_nan_loss_at:
            loss = loss * float("nan")
        optimizer.zero_grad()
        self.manual_backward(loss)
        if batch_idx == self.inject_inf_at:
            next(p for p in self.policy.parameters() if p.requires_grad).grad[0, 0] = float("inf")
        if self.clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.clip_val, gradient_clip_algorithm="norm")
        before = lora_parameters(self)
        optimizer.step()
        after = lora_parameters(self)
        moved = any(not torch.equal(before[k], after[k]) for k in before)
        self.steps.append({"moved": moved, "skipped_steps": self.trainer.precision_plugin.skipped_steps})

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    def on_save_checkpoint(self, checkpoint):
        # As vrft's PolicyModule: adapter only; the frozen (quantised) base comes from the model folder.
        keep = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


def fit(plugin: VrftPrecision, module: TinyPolicyModule, tmp_path, max_steps: int = 2, ckpt_path=None):
    trainer = bare_trainer("cpu", max_steps, plugin, default_root_dir=tmp_path)
    module.strict_loading = False  # the checkpoint holds the adapter only
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("plugin_class", [Int4Precision, Int8Precision, Bf16Precision])
def test_trainer_converts_and_trains_only_the_adapter(plugin_class, tmp_path):
    plugin = plugin_class()
    module = TinyPolicyModule(clip_val=1.0)
    trainer = fit(plugin, module, tmp_path)
    assert trainer.global_step == 2
    assert [s["moved"] for s in module.steps] == [True, True]
    expected = {"int4": {"Linear4bit": 14}, "int8": {"Linear8bitLt": 14}, "bf16": {}}[plugin.name]
    assert plugin.summary(module)["quantized_layers"] == expected
    assert plugin.device_type == "cpu"


@pytest.mark.parametrize("make_plugin", [Fp16Precision, lambda: Int4Precision(compute_dtype="fp16")])
def test_fp16_scaler_skips_an_overflowed_step_and_counts_it(make_plugin, tmp_path):
    plugin = make_plugin()
    module = TinyPolicyModule(inject_inf_at=0)
    fit(plugin, module, tmp_path)
    assert module.steps == [{"moved": False, "skipped_steps": 1}, {"moved": True, "skipped_steps": 1}]
    assert plugin.scaler.get_scale() == 2.0**15  # halved once by the overflow


ALL_PRECISIONS = [Fp32Precision, Bf16Precision, Fp16Precision, Int4Precision, Int8Precision]


@pytest.mark.parametrize("plugin_class", ALL_PRECISIONS)
@pytest.mark.parametrize("inject", ["inject_nan_loss_at", "inject_inf_at"])
def test_every_precision_skips_a_non_finite_step_and_counts_it(plugin_class, inject, tmp_path):
    # Clipping is on, as in GRPO: clip_grad_norm_ of one inf gradient would make every gradient NaN.
    plugin = plugin_class()
    module = TinyPolicyModule(clip_val=1.0, **{inject: 0})
    fit(plugin, module, tmp_path)
    # fp16 counts the inf gradient as the scaler's overflow: also a skipped step.
    assert module.steps == [{"moved": False, "skipped_steps": 1}, {"moved": True, "skipped_steps": 1}]
    assert all(torch.isfinite(p).all() for p in lora_parameters(module).values())


def test_fp16_clip_gradients_unscales_before_clipping(tmp_path):
    # Clipping the still-scaled gradients to 1e-3 and unscaling afterwards would leave a norm of 1e-3 / 65536.
    plugin = Fp16Precision()
    module = TinyPolicyModule(clip_val=1e-3)
    fit(plugin, module, tmp_path)
    assert module.grad_norms == pytest.approx([1e-3, 1e-3], rel=1e-3)
    assert [s["moved"] for s in module.steps] == [True, True] and plugin.skipped_steps == 0


def test_checkpoint_round_trip_of_a_quantised_fp16_run(tmp_path):
    plugin = Int4Precision(compute_dtype="fp16")
    first = TinyPolicyModule(inject_inf_at=0, optimizer="adamw8bit")
    trainer = fit(plugin, first, tmp_path)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert saved["Int4Precision"]["skipped_steps"] == 1
    assert saved["Int4Precision"]["scaler"]["scale"] == 2.0**15
    assert set(saved["state_dict"]) == {f"policy.{n}" for n in lora_parameters(first.policy)}

    resumed_plugin = Int4Precision(compute_dtype="fp16")
    resumed = TinyPolicyModule(optimizer="adamw8bit")
    trainer = fit(resumed_plugin, resumed, tmp_path, max_steps=3, ckpt_path=path)
    assert trainer.global_step == 3 and len(resumed.steps) == 1 and resumed.steps[0]["moved"]
    start = resumed.at_train_start
    assert start["skipped_steps"] == 1 and start["scale"] == 2.0**15
    final_first = lora_parameters(first)
    assert all(torch.equal(start["adapter"][k], final_first[k]) for k in final_first)
    assert resumed_plugin.summary(resumed)["quantized_layers"] == {"Linear4bit": 14}
    optimizer_state = trainer.optimizers[0].state
    assert any(
        v.dtype == torch.uint8
        for state in optimizer_state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )
