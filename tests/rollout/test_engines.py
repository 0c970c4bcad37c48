"""The static rollout engines against plain `generate` and the training-time forward, on the tiny model."""

import pytest
import torch
from PIL import Image

from vrft.models.policy import LoraSpec, ModelSpec, attach_lora, load_base_model, load_processor_for
from vrft.modules.logprobs import selective_logprobs
from vrft.precision.qat import QatForward
from vrft.rollout.batch import build_prompts
from vrft.rollout.engines import (
    ROLLOUT_ENGINES,
    Bf16CopyEngine,
    DequantEngine,
    HFGenerate,
    build_rollout_engine,
    check_rollout_engine,
)
from vrft.rollout.generate import generate_rollout

STATIC_ENGINES = [Bf16CopyEngine, DequantEngine]


def make_policy(precision: str = "fp32", device: str = "cpu"):
    spec = ModelSpec(name_or_path="tiny", max_pixels=12544)
    model = load_base_model(spec, torch.float32)
    policy = attach_lora(model, LoraSpec(r=4, alpha=8), gradient_checkpointing=False)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: peft starts lora_B at zero, which would hide bugs
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    if precision != "fp32":
        from vrft.precision import Int4Precision, Int8Precision

        plugin = Int8Precision if precision == "int8" else Int4Precision
        plugin(compute_dtype="bf16", adapter_dtype="fp32", qat=precision == "int4_qat").convert_module(policy)
        policy.to(device)  # bitsandbytes quantises on the move
    policy.eval()
    return policy, load_processor_for(spec)


def rows(sizes=((112, 112), (112, 112))):
    colours = [(220, 40, 40), (40, 80, 220), (30, 160, 60)]
    return [
        {"image": Image.new("RGB", size, colours[i % 3]), "problem": f"What shape is number {i}?"}
        for i, size in enumerate(sizes)
    ]


CPU = torch.device("cpu")
GREEDY = dict(do_sample=False, max_new_tokens=10, min_new_tokens=10)


@pytest.fixture(scope="module")
def fp32_policy():
    return make_policy("fp32")


@pytest.mark.parametrize("engine_class", STATIC_ENGINES)
def test_greedy_tokens_equal_generate(fp32_policy, engine_class):
    policy, processor = fp32_policy
    reference = generate_rollout(policy, processor, rows(), "{problem}", 1, GREEDY, torch.device("cpu"))
    fast = generate_rollout(
        policy, processor, rows(), "{problem}", 1, GREEDY, torch.device("cpu"), engine=engine_class()
    )
    assert torch.equal(fast.completion_ids, reference.completion_ids)


def teacher_forced_logprobs(policy, processor, batch_rows, group_size, completion_ids, device=CPU):
    """Log-probs of `completion_ids` under the training-time forward (what `GRPOModule` computes)."""
    prompts = build_prompts(processor, batch_rows, "{problem}", device)
    index = torch.arange(completion_ids.shape[0], device=device) // group_size
    model = policy.get_base_model()
    with torch.no_grad():
        hidden = model.model(
            input_ids=torch.cat([prompts.input_ids[index], completion_ids], 1),
            attention_mask=torch.cat([prompts.attention_mask[index], torch.ones_like(completion_ids)], 1),
            mm_token_type_ids=torch.cat(
                [prompts.mm_token_type_ids[index], torch.zeros_like(completion_ids)], 1
            ),
            pixel_values=torch.cat(
                [torch.split(prompts.pixel_values, prompts.patch_counts)[i] for i in index]
            ),
            image_grid_thw=prompts.image_grid_thw[index],
        ).last_hidden_state
        length = completion_ids.shape[1]
        return selective_logprobs(hidden[:, -length - 1 : -1], completion_ids, model.lm_head)


@pytest.mark.parametrize("engine_class", STATIC_ENGINES)
def test_sampled_logprobs_match_training_forward_with_left_padding(fp32_policy, engine_class):
    # Different image sizes give prompts of different lengths: left padding and per-row positions.
    policy, processor = fp32_policy
    batch_rows = rows(((56, 84), (112, 112)))
    engine = engine_class()
    torch.manual_seed(0)
    sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8, min_new_tokens=8)
    rollout = generate_rollout(
        policy, processor, batch_rows, "{problem}", 3, sampling, torch.device("cpu"), engine=engine
    )
    # Like with like: the log-probs of the very tokens the engine sampled, under the training forward. The
    # two compute the same fp32 values by different kernels (static KV cache, fused attention vs eager),
    # whose rounding over 2 layers stays ~1e-6; 1e-4 leaves 100x margin and still catches any real bug
    # (a wrong position or mask moves a log-prob by > 1e-2).
    expected = teacher_forced_logprobs(policy, processor, batch_rows, 3, rollout.completion_ids)
    torch.testing.assert_close(engine.last_logprobs, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("engine_class", STATIC_ENGINES)
def test_static_engines_sample_the_policy_qat_trains(engine_class, monkeypatch):
    # QAT's forward multiplies by the merged adapter rounded to the 4-bit grid; the engine must sample that
    # policy, not the base plus the unrounded adapter (the int4 policy), or its log-probs drift from training.
    policy, processor = make_policy("int4_qat")
    batch_rows = rows()

    def gap_to_training(engine) -> float:
        torch.manual_seed(0)
        sampling = dict(
            do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8, min_new_tokens=8
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rollout = generate_rollout(
                policy, processor, batch_rows, "{problem}", 2, sampling, CPU, engine=engine
            )
            expected = teacher_forced_logprobs(policy, processor, batch_rows, 2, rollout.completion_ids)
        return float((engine.last_logprobs - expected).abs().mean())

    gap = gap_to_training(engine_class())
    with monkeypatch.context() as patch:  # the engine as it was: blind to the rounding
        patch.setattr(QatForward, "effective_weight", lambda self: None)
        unrounded_gap = gap_to_training(engine_class())
    # Measured: 4e-4 nats per token (bf16 rounding of two matmul orders) against 0.05 without the rounding.
    assert gap < 5e-3
    assert gap < unrounded_gap / 10


@pytest.mark.slow
def test_dequant_engine_matches_generate_on_int4_weights():
    policy, processor = make_policy("int4")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = generate_rollout(policy, processor, rows(), "{problem}", 1, GREEDY, torch.device("cpu"))
        fast = generate_rollout(
            policy, processor, rows(), "{problem}", 1, GREEDY, torch.device("cpu"), engine=DequantEngine()
        )
    # bf16 rounding differs slightly between the two matmul orders: most tokens agree, the first always.
    agree = (fast.completion_ids == reference.completion_ids).float().mean()
    assert torch.equal(fast.completion_ids[:, 0], reference.completion_ids[:, 0])
    assert agree >= 0.8


def test_min_new_tokens_blocks_eos_and_pads_after_it(fp32_policy):
    policy, processor = fp32_policy
    prompts = build_prompts(processor, rows(), "{problem}", torch.device("cpu"))
    engine, pad = DequantEngine(), 0
    free = engine.generate(policy, prompts, 1, dict(do_sample=False, max_new_tokens=6), [151645], pad)
    eos = int(free[0, 0])  # call the token row 0 greedily writes first "EOS"
    stopped = engine.generate(policy, prompts, 1, dict(do_sample=False, max_new_tokens=6), [eos], pad)
    assert stopped[0, 0] == eos and (stopped[0, 1:] == pad).all()
    blocked = engine.generate(
        policy, prompts, 1, dict(do_sample=False, max_new_tokens=6, min_new_tokens=3), [eos], pad
    )
    assert not (blocked[:, :3] == eos).any()


def test_engine_registry_names_every_choice_and_rejects_unknown():
    assert set(ROLLOUT_ENGINES) == {"hf", "bf16_copy", "dequant", "packed"}
    assert isinstance(build_rollout_engine("hf"), HFGenerate)
    with pytest.raises(ValueError, match="algorithm.rollout_engine='vllm'.*bf16_copy"):
        build_rollout_engine("vllm")
    with pytest.raises(ValueError, match="^algorithm.rollout_engine='auto' is not one of .*'packed'\\]"):
        build_rollout_engine("auto")  # resolved before an engine is built; the registry has no `auto`
    check_rollout_engine("auto")  # where a setting may still say auto


def test_unsupported_generation_setting_names_the_fix(fp32_policy):
    policy, processor = fp32_policy
    prompts = build_prompts(processor, rows(), "{problem}", torch.device("cpu"))
    with pytest.raises(ValueError, match="rollout_engine=hf"):
        DequantEngine().generate(policy, prompts, 2, dict(max_new_tokens=4, num_beams=2), [151645], 0)


@pytest.mark.gpu
@pytest.mark.parametrize("engine_class", STATIC_ENGINES)
def test_cuda_graph_decode_matches_generate(engine_class):
    policy, processor = make_policy("fp32")
    policy.to("cuda")
    engine = engine_class()
    greedy = dict(do_sample=False, max_new_tokens=40, min_new_tokens=40)
    device = torch.device("cuda")
    reference = generate_rollout(policy, processor, rows(), "{problem}", 1, greedy, device)
    fast = generate_rollout(policy, processor, rows(), "{problem}", 1, greedy, device, engine=engine)
    assert engine.last_stats["cuda_graph"] == 1.0
    assert torch.equal(fast.completion_ids, reference.completion_ids)


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "tolerance"), [("int8", 0.1), ("int4_qat", 0.01)])
def test_bf16_copy_samples_the_quantised_policy_on_cuda(precision, tolerance):
    # What the small-model comparison runs (conf/experiment/small_parity_detection_bf16_copy.yaml): quantised
    # weights dequantised and merged under a CUDA graph. The training forward of int8 also rounds its inputs
    # to int8 (LLM.int8), which the copy leaves out: 0.1 nats a token bounds that rounding (not measured: on
    # the CPU bitsandbytes multiplies by the dequantised weight), while a weight read wrong moves log-probs by
    # nats. QAT: 4e-4 on the CPU, 0.05 with the adapter merged unrounded (the CPU test above).
    policy, processor = make_policy(precision, "cuda")
    engine, device = Bf16CopyEngine(), torch.device("cuda")
    torch.manual_seed(0)
    sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16, min_new_tokens=16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        rollout = generate_rollout(policy, processor, rows(), "{problem}", 4, sampling, device, engine=engine)
        expected = teacher_forced_logprobs(policy, processor, rows(), 4, rollout.completion_ids, device)
    assert engine.last_stats["cuda_graph"] == 1.0
    assert float((engine.last_logprobs - expected).abs().mean()) < tolerance


def test_inverse_cdf_sampler_draws_from_the_softmax():
    from vrft.rollout.engines import InverseCdfSampler

    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf"), -1.0]]).repeat(20000, 1)
    chosen = InverseCdfSampler(temperature=0.7)(None, logits)
    assert torch.isinf(chosen).sum(1).eq(4).all()  # exactly one finite score per row: greedy picks it
    counts = torch.bincount(chosen.argmax(1), minlength=5).float() / len(chosen)
    # Seeded, so the same draws every run. The tolerance is also safe for any seed: a frequency of n = 20000
    # draws has a standard deviation <= sqrt(0.25 / n) = 0.0035, so 0.01 is 2.8 sigma per token, while a
    # wrong temperature or CDF would move the first token's 0.77 by > 0.05.
    torch.testing.assert_close(counts, (logits[0] / 0.7).softmax(-1), atol=0.01, rtol=0)
    assert counts[3] == 0  # a masked token is never drawn
    top = InverseCdfSampler(temperature=1.0, top_p=0.5)(None, logits[:2000]).argmax(1)
    assert top.eq(0).all()  # token 0 alone holds 66% of the mass


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoder_rms_norm_is_the_policys_norm_bit_for_bit(dtype):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRMSNorm

    from vrft.rollout.stages import rms_norm

    torch.manual_seed(0)
    norm = Qwen2VLRMSNorm(3584, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = torch.randn(16, 1, 3584, dtype=dtype) * 3
    with torch.no_grad():
        assert torch.equal(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))


@pytest.mark.gpu
def test_fused_decode_ops_give_the_torch_decode_steps_logits_on_cuda():
    # One decode step's element-wise stages and attention in Triton (FusedDecodeOps) against torch's
    # (DecodeOps), teacher forced over the same tokens from the same prefill. The fused RMSNorm sums in
    # another order, so a rare 16-bit value rounds one step away (tests/kernels/test_decode_fusions.py), and
    # the kernel rounds its attention probabilities to bf16 (2^-8 relative) where torch's keeps fp32; through two
    # small layers that moves logits of magnitude ~1 by ~1e-2 at most, while a wrong rotation, cache column,
    # mask or norm moves them by ~1: 2^-4 separates the two.
    from vrft.rollout.base import Sampling
    from vrft.rollout.decoder import decode_ops, decode_step, prefill
    from vrft.rollout.stages import DecodeOps, FusedDecodeOps
    from vrft.rollout.static import grouped_state, prompt_inputs

    policy, processor = make_policy("fp32")
    policy.to(device="cuda", dtype=torch.bfloat16)
    device = torch.device("cuda")
    prompts = build_prompts(processor, rows(), "{problem}", device)
    weights = Bf16CopyEngine().read_weights(policy)
    assert isinstance(decode_ops(weights, device), FusedDecodeOps)
    assert type(decode_ops(weights, device, fused=False)) is DecodeOps
    embeds, positions = prompt_inputs(policy, prompts)
    _, cache = prefill(weights, embeds.to(weights.dtype), positions, prompts.attention_mask)
    steps = Sampling.from_generation(GREEDY).max_new_tokens
    states = [grouped_state(weights, prompts, positions, cache, 2, steps) for _ in range(2)]
    tokens = torch.randint(0, 1000, (steps, 4), generator=torch.Generator().manual_seed(0)).to(device)
    for step in range(steps):
        logits = []
        for state, ops in zip(states, (DecodeOps(), FusedDecodeOps()), strict=True):
            state.tokens.copy_(tokens[step])
            logits.append(decode_step(weights, state, ops))
        torch.testing.assert_close(logits[1], logits[0], atol=2**-4, rtol=0)
    for layer in range(weights.num_layers):
        torch.testing.assert_close(states[1].keys[layer], states[0].keys[layer], atol=2**-4, rtol=0)
        torch.testing.assert_close(states[1].values[layer], states[0].values[layer], atol=2**-4, rtol=0)


def test_decode_ops_are_torchs_off_cuda_or_when_asked_and_say_why(fp32_policy, caplog):
    import logging

    from vrft.rollout.decoder import decode_ops
    from vrft.rollout.stages import DecodeOps

    policy, _ = fp32_policy
    weights = Bf16CopyEngine().read_weights(policy)
    with caplog.at_level(logging.DEBUG, logger="vrft.rollout.decoder"):
        assert type(decode_ops(weights, CPU)) is DecodeOps
    # without Triton (CI) or off CUDA (here): either reason is named
    assert "decode step with torch's element-wise ops: " in caplog.text
    assert "Triton is not installed" in caplog.text or "run on CUDA, the decoder is on cpu" in caplog.text
    assert type(decode_ops(weights, torch.device("cuda"), fused=False)) is DecodeOps
    assert Bf16CopyEngine(fused_decode=False).fused_decode is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_bf16_copy_merges_lora_without_touching_the_policy(dtype):
    # The copy adds scale * B A into an fp32 matrix in place; a dense fp32 base must be copied first, not
    # changed under the policy that trains on it.
    from peft import LoraConfig, get_peft_model

    from vrft.rollout.weights import linear_op

    torch.manual_seed(0)
    policy = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(48, 32)), LoraConfig(r=4, lora_alpha=8, target_modules=["0"])
    )
    layer = policy.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # peft starts B at zero
    base = layer.base_layer.weight.detach().clone()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    with torch.no_grad():
        op = linear_op(layer, merge=True, dtype=dtype)
    assert torch.equal(layer.base_layer.weight, base)
    expected = base.double() + 2.0 * (b.double() @ a.double())  # scale = alpha / r
    # fp32 sums of 4-term products; then one rounding to the copy's dtype (bf16: 2^-8 relative)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(op.weight.double(), expected, rtol=tolerance, atol=1e-6)
    assert op.weight.dtype == dtype
