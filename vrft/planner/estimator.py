"""Peak CUDA memory of a GRPO step, by component and phase, from sizes alone (nothing is allocated).

All figures are bytes unless a name says GiB. The model is a sum of terms with a physical meaning
(weights, adapter, gradients, optimizer state, KV cache, activations, log-prob buffers, vision tower);
the few coefficients that depend on how PyTorch and transformers hold intermediates are the `Calibration`
fields, fitted to the benchmark measurements in `bench/memory/` (see `bench/README.md`).

Phases (steady state, i.e. after the first optimizer step created the optimizer state):
- rollout: resident + kept workspaces + rollout engine's weights + the prompts' pixels + the larger of the
  prefill work (vision tower, prompt activations) and the decode steps' (KV cache, sampling, the CUDA graph's
  outputs); for `bf16_copy`, or its copy's making (one matrix's LoRA merge in fp32) if that is larger
- reference: resident + kept workspaces + stored rollouts + a no-grad forward of one micro-batch + log-prob
  chunk
- update: resident + gradients + stored rollouts + checkpointed activations + one layer's recompute
  + log-prob chunk backward
where resident = weights + adapter + optimizer state (paged optimizer state lives outside PyTorch's pool).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30
ACTIVATION_BYTES = 2  # bf16/fp16 activations; fp32 runs pass 4


@dataclass(frozen=True)
class ModelShape:
    """Language-model and vision-tower sizes of a Qwen2-VL / Qwen2.5-VL config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_dim: int  # width of the vision blocks
    vision_mlp: int  # hidden width of a vision block's MLP
    vision_depth: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        """Key (= value) width per token and layer."""
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class WeightFootprint:
    """What the model holds on the device, as the precision plugin stores it."""

    weight_bytes: int  # every frozen parameter, packed 4-bit/int8 storage and quantisation state included
    lm_linear_params: int  # parameters of the language model's projections (what a bf16 copy holds)
    dequant_params: int  # the largest quantised projection (0 if none): scratch of its dequantisation
    adapter_params: int  # trainable LoRA parameters
    fused_lora_a_params: int  # the A matrices of adapters on quantised language-model projections
    adapter_bytes_per_param: int  # 4 for fp32 adapters, 2 for bf16
    optimizer_bytes_per_param: float  # optimizer state per trainable parameter
    optimizer_paged: bool  # paged (managed) state sits outside PyTorch's reserved pool
    int8_layers: int = 0  # decoder layers whose projections are bitsandbytes LLM.int8 (see Calibration)


@dataclass(frozen=True)
class Workload:
    """The GRPO settings that size the activations."""

    group_size: int
    rollout_batch_size: int
    update_micro_batch_size: int
    max_new_tokens: int
    logprob_chunk_size: int
    image_tokens: int  # visual tokens per image after merging (max_pixels / 784 at most)
    prompt_text_tokens: int  # chat template + question tokens besides the image
    rollouts_per_step: int  # rollouts stored until the update (prompts_per_step / rollout_batch_size)
    gradient_checkpointing: bool = True
    reference: bool = True  # beta > 0: a reference forward per rollout
    rollout_engine: str = "hf"
    activation_bytes: int = ACTIVATION_BYTES
    ranks: int = 1  # processes of the run; `rollouts_per_step` is already this rank's share of the step
    shard_weights: bool = (
        False  # FSDP: weights, adapter, optimizer state split 1/ranks (DDP: whole); gradients whole in both
    )

    @property
    def sequences(self) -> int:
        return self.group_size * self.rollout_batch_size

    @property
    def prompt_tokens(self) -> int:
        return self.image_tokens + self.prompt_text_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.max_new_tokens


@dataclass(frozen=True)
class Calibration:
    """Coefficients fitted to measured peaks (GRPO on an H200 under a memory cap, torch 2.11, bnb 0.50)."""

    layer_recompute_hidden: float = 30.0  # one layer's autograd tensors per token, in hidden widths
    layer_recompute_mlp: float = 5.0  # ... and in MLP widths
    layer_saved_hidden: float = 20.0  # per token per layer without checkpointing, hidden widths
    layer_saved_mlp: float = 4.0  # ... MLP widths
    forward_hidden: float = 4.0  # live tensors of a no-grad layer forward per token, hidden widths
    forward_mlp: float = 3.0  # ... MLP widths
    vision_width: float = 14.0  # live tensors per patch in a vision block, in vision widths
    logits_forward_bytes: float = 10.0  # per chunk position and vocab entry, no grad (bf16 + fp32 + exp)
    logits_backward_bytes: float = 18.5  # ... with the backward (recomputed logits, softmax, gradients)
    dynamic_kv_factor: float = 1.5  # generate's growing cache: copies while concatenating, fragmentation
    reserved_factor: float = 1.02  # reserved / allocated at the peak (allocator rounding, fragmentation)
    reserved_factor_int8: float = 1.11  # int8 matmuls' many differently sized temporaries fragment the pool
    reserved_extra_gb: float = 0.05  # small-block pools, rounding (the workspaces are `kept_workspaces_gb`)
    # Allocated on first use and kept (cuBLAS / cuBLASLt workspaces, ...): the second step's rollout began at
    # 0.104 GiB over the weights and the adapter on an H100 and an H200 (bench/rollout/results.md, "The
    # planner's rollout terms"). Added to the rollout and reference phases; the update's coefficients above
    # were fitted to peaks that held it already.
    kept_workspaces_gb: float = 0.1
    # What a static engine's decode step leaves allocated in every layer, per sequence and layer, in MLP
    # widths: `packed`'s per-layer caches (`_OncePerInput` in vrft/rollout/packed.py) hold each layer's last
    # inputs and kernel outputs, so the captured step (the CUDA graph's pool) cannot reuse one layer's blocks
    # for the next (7B, 16 sequences: 0.061 GiB live at the rollout's peak). `bf16_copy` keeps no such cache:
    # for it the term is a bound, not a measurement.
    decode_graph_mlp: float = 4.0
    cuda_context_gb: float = 0.6  # CUDA context and kernels: outside PyTorch's pool, but on the card


@dataclass
class MemoryPlan:
    """Predicted peak memory: per component and phase (bytes), the overall peak reserved in GiB."""

    components: dict[str, float]  # name -> bytes
    phases: dict[str, float]  # phase -> predicted peak allocated bytes
    peak_phase: str
    peak_reserved_gb: float
    cuda_context_gb: float
    paged_gb: float = 0.0  # paged optimizer state (managed memory, not in the reserved figure)
    notes: list[str] = field(default_factory=list)

    @property
    def device_gb(self) -> float:
        """What the card must hold: reserved pool + CUDA context + paged state."""
        return self.peak_reserved_gb + self.cuda_context_gb + self.paged_gb

    def components_gb(self) -> dict[str, float]:
        return {name: value / GIB for name, value in self.components.items()}


def vision_patches(image_tokens: int, shape: ModelShape) -> int:
    """Patches the vision tower sees per image (each merged token is spatial_merge^2 patches)."""
    return image_tokens * shape.spatial_merge**2


def kv_cache_bytes(shape: ModelShape, sequences: int, tokens: int, activation_bytes: int = 2) -> int:
    """Keys and values of `sequences` x `tokens` over all layers."""
    return 2 * shape.layers * sequences * tokens * shape.kv_width * activation_bytes


def vision_bytes(shape: ModelShape, images: int, image_tokens: int, cal: Calibration, a: int) -> float:
    """Live tensors of one vision block over `images` images (no autograd), plus the merged output."""
    patches = images * vision_patches(image_tokens, shape)
    return patches * shape.vision_dim * cal.vision_width * a + images * image_tokens * shape.hidden * a


def layer_forward_bytes(shape: ModelShape, tokens: int, cal: Calibration, a: int) -> float:
    """Live tensors of one decoder layer's forward without autograd over `tokens` tokens."""
    return tokens * (cal.forward_hidden * shape.hidden + cal.forward_mlp * shape.intermediate) * a


def _rollout_bytes(shape: ModelShape, weights: WeightFootprint, work: Workload, cal: Calibration) -> dict:
    """Rollout phase: the prefill's transients, then the full KV cache while decoding (beyond resident)."""
    a = work.activation_bytes
    scratch_matrix = weights.dequant_params * a  # one quantised matrix dequantised for its matmul
    n, lp, lt = work.sequences, work.prompt_tokens, work.total_tokens
    sampling = n * shape.vocab * 4 * 3  # fp32 logits, probabilities, noise of one step
    patch_dim = 3 * shape.temporal_patch_size * shape.patch_size**2
    # the prompts' pixel values (fp32), held through the rollout
    pixels = work.rollout_batch_size * vision_patches(work.image_tokens, shape) * patch_dim * 4
    if work.rollout_engine == "hf":
        kv = kv_cache_bytes(shape, n, lt, a) * cal.dynamic_kv_factor
        rows = n  # generate expands the inputs G times before its prefill
        decode = kv + sampling
    else:  # one prefill per prompt; its cache kept once for the G rows, each row's own for its new tokens
        rows = work.rollout_batch_size
        kv = kv_cache_bytes(shape, rows, lp, a) + kv_cache_bytes(shape, n, work.max_new_tokens, a)
        decode = kv + sampling + n * shape.layers * cal.decode_graph_mlp * shape.intermediate * a
    prefill = max(
        vision_bytes(shape, rows, work.image_tokens, cal, a),
        layer_forward_bytes(shape, rows * lp, cal, a) + kv_cache_bytes(shape, rows, lp, a) + scratch_matrix,
    )
    # packed: decode steps read the 4-bit weights in place (its prefill's scratch matrix is counted above);
    # it holds the A matrices of the fused adapters in the compute dtype, concatenated per shared input
    # (vrft.rollout.packed.SharedLoraInput): a copy even of bf16 adapters, for all but o and down
    packed = weights.fused_lora_a_params * a
    engine = {"bf16_copy": weights.lm_linear_params * a, "dequant": scratch_matrix, "packed": packed}.get(
        work.rollout_engine, 0
    )
    # bf16_copy merges LoRA into each matrix in fp32 before its copy is made: the largest one's fp32 sum
    # beside its copy, while (nearly) every other copy exists (vrft.rollout.weights.linear_op)
    merging = (4 + a) * shape.hidden * shape.intermediate if work.rollout_engine == "bf16_copy" else 0
    return {
        "kv_cache": kv,
        "prefill": prefill,
        "rollout_engine": engine,
        "peak": engine + max(merging, pixels + max(prefill, decode)),
    }


def _update_bytes(shape: ModelShape, weights: WeightFootprint, work: Workload, cal: Calibration) -> dict:
    """Stored rollouts (fp32 pixel values dominate), the reference forward and the update micro-batch's
    forward/backward (beyond resident); `notes` says what the user should know."""
    a, lt = work.activation_bytes, work.total_tokens
    scratch_matrix = weights.dequant_params * a
    patch_dim = 3 * shape.temporal_patch_size * shape.patch_size**2
    stored = work.rollouts_per_step * work.rollout_batch_size * vision_patches(work.image_tokens, shape)
    stored = stored * patch_dim * 4 + work.rollouts_per_step * work.sequences * work.max_new_tokens * 4 * 3
    m = work.update_micro_batch_size
    tokens = m * lt
    chunk = min(work.logprob_chunk_size, m * work.max_new_tokens)
    vision = vision_bytes(shape, m, work.image_tokens, cal, a)
    hidden = tokens * shape.hidden * a  # the final hidden states the log-prob chunks read
    # The layer stack and the log-prob chunks run one after the other: their transients never coexist.
    forward = layer_forward_bytes(shape, tokens, cal, a) + scratch_matrix
    logits_forward = chunk * shape.vocab * cal.logits_forward_bytes + hidden
    reference = stored + max(vision, forward, logits_forward) if work.reference else None
    notes = []
    if work.gradient_checkpointing:
        saved = shape.layers * tokens * shape.hidden * a  # each layer's input, kept for the recompute
        width = cal.layer_recompute_hidden * shape.hidden + cal.layer_recompute_mlp * shape.intermediate
        live = tokens * width * a  # one layer recomputed with autograd during the backward
    else:
        width = cal.layer_saved_hidden * shape.hidden + cal.layer_saved_mlp * shape.intermediate
        saved, live = shape.layers * tokens * width * a, 0
        notes.append("gradient checkpointing is off: activations of every layer are kept for the backward")
    logits = chunk * shape.vocab * cal.logits_backward_bytes
    return {
        "stored_rollouts": stored,
        "vision_tower": vision,
        "activations": saved + live,
        "logprob_buffers": logits,
        "reference": reference,
        "update": stored + saved + max(live + scratch_matrix, logits),
        "notes": notes,
    }


def estimate(shape: ModelShape, weights: WeightFootprint, work: Workload, cal: Calibration) -> MemoryPlan:
    """The memory plan of one GRPO step; see the module docstring for the phase model."""
    shards = work.ranks if work.shard_weights else 1
    weight_bytes = weights.weight_bytes / shards
    adapter = weights.adapter_params * weights.adapter_bytes_per_param / shards
    optimizer = weights.adapter_params * weights.optimizer_bytes_per_param / shards
    # FSDP gathers one wrapped unit (a decoder layer) at a time; a layer's share of the weights stands for it.
    gathered = weights.weight_bytes / shape.layers if shards > 1 else 0.0
    resident = weight_bytes + gathered + adapter + (0 if weights.optimizer_paged else optimizer)
    rollout, update = _rollout_bytes(shape, weights, work, cal), _update_bytes(shape, weights, work, cal)
    # Whole on every rank, also under FSDP: micro-batches accumulate under FSDP's `no_sync`, which keeps the
    # adapter's gradients unsharded until the step's last backward reduce-scatters them.
    gradients = weights.adapter_params * weights.adapter_bytes_per_param
    kept = cal.kept_workspaces_gb * GIB
    phases = {
        "rollout": resident + kept + rollout["peak"],
        "reference": resident + kept + update["reference"] if update["reference"] is not None else 0.0,
        "update": resident + gradients + update["update"],
    }
    peak_phase = max(phases, key=phases.get)
    factor = cal.reserved_factor_int8 if weights.int8_layers else cal.reserved_factor
    peak_reserved = phases[peak_phase] * factor + cal.reserved_extra_gb * GIB
    components = {
        "weights": weight_bytes,
        **({"gathered_layer": gathered} if gathered else {}),
        "adapter": adapter,
        "gradients": gradients,
        "optimizer": optimizer,
        "kept_workspaces": kept,
        **{key: rollout[key] for key in ("kv_cache", "rollout_engine", "prefill")},
        **{key: update[key] for key in ("stored_rollouts", "activations", "logprob_buffers", "vision_tower")},
    }
    return MemoryPlan(
        components=components,
        phases=phases,
        peak_phase=peak_phase,
        peak_reserved_gb=peak_reserved / GIB,
        cuda_context_gb=cal.cuda_context_gb,
        paged_gb=optimizer / GIB if weights.optimizer_paged else 0.0,
        notes=update["notes"] + rank_notes(work),
    )


def rank_notes(work: Workload) -> list[str]:
    """What a multi-process plan assumes, per rank."""
    if work.ranks == 1:
        return []
    if work.shard_weights:
        return [
            f"per rank of {work.ranks} (fsdp): weights, adapter and optimizer state are split "
            f"1/{work.ranks}, plus one gathered decoder layer; not split: the adapter's gradients (accumulated "
            "under no_sync), KV cache, activations, log-prob buffers and stored rollouts (each rank decodes "
            "its own prompts, with the hf engine)"
        ]
    return [
        f"per rank of {work.ranks} (ddp): every rank holds the whole model, adapter and optimizer state; only "
        f"the step's prompts are split ({work.rollouts_per_step} rollout(s) stored per rank)"
    ]
