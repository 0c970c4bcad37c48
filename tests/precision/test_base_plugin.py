"""The base plugin's hooks on their own: dtype options, autocast, scaler state, parameter casting."""

from __future__ import annotations

import pytest
import torch
from tiny_lora import lora_model

from vrft.precision import Bf16Precision, Fp16Precision, Fp32Precision, Int4Precision, VrftPrecision
from vrft.precision.base import parse_dtype


@pytest.mark.parametrize(
    ("value", "expected"),
    [("bf16", torch.bfloat16), ("float16", torch.float16), (torch.float32, torch.float32)],
)
def test_parse_dtype_accepts_short_and_long_names(value, expected):
    assert parse_dtype(value, "precision.compute_dtype", ("fp32", "bf16", "fp16")) is expected


def test_parse_dtype_names_the_option_and_the_choices():
    with pytest.raises(
        ValueError, match=r"precision.load_dtype='int3' is not supported here; choose one of fp32, bf16"
    ):
        parse_dtype("int3", "precision.load_dtype", ("fp32", "bf16"))


@pytest.mark.parametrize(
    ("plugin", "autocast_dtype"),
    [
        (Fp32Precision(), None),
        (Bf16Precision(), torch.bfloat16),
        (Fp16Precision(), torch.float16),
        (Int4Precision(), torch.bfloat16),
    ],
)
def test_forward_context_autocasts_to_the_compute_dtype(plugin, autocast_dtype):
    plugin.device_type = "cpu"
    with plugin.forward_context():
        enabled = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu")
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert enabled is (autocast_dtype is not None)
    assert product.dtype == (autocast_dtype or torch.float32)
    if autocast_dtype is not None:
        assert dtype == autocast_dtype


def test_precision_strings_lightning_reads():
    assert [p.precision for p in (Fp32Precision(), Bf16Precision(), Fp16Precision())] == [
        "32-true",
        "bf16-mixed",
        "16-mixed",
    ]
    assert Int4Precision(compute_dtype="fp16").precision == "16-mixed"


def test_convert_module_casts_frozen_weights_and_adapters_and_keeps_ties_and_buffers():
    plugin = Bf16Precision()
    model = plugin.convert_module(lora_model(torch.float32))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen) and all(p.dtype == torch.float32 for p in adapters)
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.language_model.embed_tokens.weight
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if n.endswith("inv_freq"))


def test_bf16_adapters_when_asked():
    model = Bf16Precision(adapter_dtype="bf16").convert_module(lora_model(torch.float32))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)


def test_scaler_state_round_trips_through_state_dict():
    plugin = Fp16Precision(init_scale=1024.0)
    plugin.scaler.scale(torch.ones(()))  # the scale tensor is created lazily
    plugin.scaler.update(256.0)
    plugin.skipped_steps = 3
    state = plugin.state_dict()
    restored = Fp16Precision()
    restored.load_state_dict(state)
    assert restored.scaler.get_scale() == 256.0 and restored.skipped_steps == 3
    assert restored.state_dict() == state


def test_modes_without_a_scaler_keep_only_the_skipped_step_count():
    for plugin in (Fp32Precision(), Bf16Precision(), Int4Precision()):
        assert plugin.scaler is None and plugin.state_dict() == {"skipped_steps": 0}
        plugin.load_state_dict({"skipped_steps": 2})
        assert plugin.skipped_steps == 2
        plugin.load_state_dict({})


def test_bad_init_scale_is_refused():
    with pytest.raises(ValueError, match=r"precision.init_scale=0 must be positive"):
        Fp16Precision(init_scale=0)


def test_every_mode_is_a_vrft_precision_with_its_name():
    names = [cls().name for cls in (Fp32Precision, Bf16Precision, Fp16Precision, Int4Precision)]
    assert names == ["fp32", "bf16", "fp16", "int4"]
    assert all(isinstance(cls(), VrftPrecision) for cls in (Fp32Precision, Int4Precision))
