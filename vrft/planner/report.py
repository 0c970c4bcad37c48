"""Printing a memory plan, and refusing to start a run the plan says will not fit."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from vrft.planner.estimator import GIB
from vrft.planner.planning import Verdict, budget_gb, precision_name, verdict

log = logging.getLogger(__name__)

LABELS = {
    "weights": "weights (as stored by the precision plugin)",
    "adapter": "LoRA adapter",
    "gradients": "LoRA gradients",
    "optimizer": "optimizer state",
    "kept_workspaces": "library workspaces (cuBLAS, kept)",
    "gathered_layer": "gathered layer (fsdp, unsharded)",
    "kv_cache": "KV cache (rollout)",
    "rollout_engine": "rollout engine weights / scratch",
    "prefill": "prefill + vision (rollout)",
    "stored_rollouts": "stored rollouts (pixels, log-probs)",
    "activations": "update activations",
    "logprob_buffers": "log-prob chunk buffers",
    "vision_tower": "vision tower (update micro-batch)",
}


class PlanDoesNotFit(ValueError):
    """The planner predicts more memory than the budget; the message holds the plan and the fix."""


def format_verdict(cfg: DictConfig, result: Verdict) -> str:
    """The plan as a readable block: settings, components, phase peaks, verdict and suggestion."""
    plan, a = result.plan, cfg.algorithm
    lines = [
        f"memory plan: model={cfg.model.name_or_path} precision={precision_name(cfg.precision)} "
        f"optimizer={str(OmegaConf.select(cfg, 'optimizer._target_', default='?')).rsplit('.', 1)[-1]} "
        f"rollout_engine={a.get('rollout_engine', 'hf')}",
        f"  G={a.group_size} x {a.rollout_batch_size} prompts, update micro-batch {a.update_micro_batch_size}, "
        f"{a.max_new_tokens} new tokens, max_pixels {cfg.model.max_pixels}, "
        f"gradient checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}",
        "  component                                   GiB",
    ]
    for name, value in plan.components.items():
        lines.append(f"  {LABELS.get(name, name):<42}{value / GIB:6.2f}")
    phases = "  ".join(f"{name} {value / GIB:.2f}" for name, value in plan.phases.items() if value)
    lines.append(f"  phase peaks (allocated GiB): {phases}")
    lines.append(
        f"  predicted peak reserved: {plan.peak_reserved_gb:.2f} GiB ({plan.peak_phase}); on the card with the "
        f"CUDA context ({plan.cuda_context_gb:.2f}) and paged optimizer state ({plan.paged_gb:.2f}): "
        f"{plan.device_gb:.2f} GiB"
    )
    lines += [f"  note: {note}" for note in plan.notes]
    if result.budget_gb is None:
        lines.append(f"  budget: unknown ({result.budget_source}); add a profile such as +hw=rtx4090")
    elif result.fits:
        spare = result.budget_gb - plan.device_gb
        lines.append(
            f"  verdict: FITS the {result.budget_gb:.1f} GiB budget ({result.budget_source}), {spare:.2f} GiB spare"
        )
    else:
        lines.append(
            f"  verdict: DOES NOT FIT the {result.budget_gb:.1f} GiB budget ({result.budget_source}) by "
            f"{plan.device_gb - result.budget_gb:.2f} GiB"
        )
        if result.suggestion:
            lines.append(f"  suggestion: {' '.join(result.suggestion)}")
        else:
            lines.append(
                "  suggestion: none of the planner's changes is enough; use a bigger GPU or a smaller model"
            )
    return "\n".join(lines)


def format_cards(needed: dict[str, int | None], card_gb: float, fsdp_refusal: str | None = None) -> str:
    """How many `card_gb` cards the run needs under each strategy (`vrft.planner.planning.cards_needed`);
    `fsdp_refusal`: why the run's precision cannot run under FSDP (its count is then on paper only)."""
    parts = []
    for strategy, cards in needed.items():
        text = f"{strategy}: {cards}" if cards else f"{strategy}: no count up to 16 fits"
        if strategy == "fsdp" and fsdp_refusal:
            text += f" (on paper: this precision does not run under fsdp: {fsdp_refusal.split(';')[0]})"
        parts.append(text)
    return f"  {card_gb:g} GB cards needed (per-rank peak within the card): " + "; ".join(parts)


def enforce_plan(cfg: DictConfig) -> Verdict | None:
    """Before loading the model: raise `PlanDoesNotFit` if the plan exceeds the budget (`plan.enforce=false`
    only warns). Returns the verdict, or None when no budget is known (CPU without a hw profile)."""
    settings = cfg.get("plan") or {}
    if budget_gb(cfg)[0] is None:
        return None
    result = verdict(cfg)
    text = format_verdict(cfg, result)
    if result.fits:
        log.info("%s", text)
        return result
    if settings.get("enforce", True):
        raise PlanDoesNotFit(
            f"{text}\nthe planner predicts this run will not fit; apply the suggestion, or start anyway with "
            "plan.enforce=false"
        )
    log.warning("%s\nplan.enforce=false: starting anyway", text)
    return result
