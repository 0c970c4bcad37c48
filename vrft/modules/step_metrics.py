"""What one GRPO optimizer step logs, from the statistics its rollouts and micro-batches collected."""

from __future__ import annotations

from collections.abc import Sequence

from vrft.rollout.batch import Rollout

# Per-rollout statistics that are maxima (not sums) over the step's rollouts.
WORST = {"completion_length_max", "rollout_peak_gb"}


def step_totals(
    rollouts: Sequence[Rollout], loss_total: float, stat_sums: dict, peaks: dict
) -> tuple[dict[str, float], dict[str, float]]:
    """This rank's sums (counts, reward sums, loss statistics) and peaks (seconds, memory, maxima) of one
    step, before they are reduced over the ranks (sums added, peaks the maximum)."""
    sums: dict[str, float] = {
        "loss": loss_total,
        "num_sequences": float(sum(r.num_sequences for r in rollouts)),
    }
    peaks = dict(peaks)
    for rollout in rollouts:
        for key, value in rollout.stats.items():
            into = peaks if key.endswith("_seconds") else sums
            into[key] = max(into.get(key, 0.0), value) if key in WORST else into.get(key, 0.0) + value
    peaks.update({key: sums.pop(key) for key in WORST & set(sums)})
    for key, value in stat_sums.items():  # `_max` statistics are maxima, the others sums
        (peaks if key.endswith("_max") else sums)[f"update/{key}"] = value
    return sums, peaks


def step_metrics(
    sums: dict[str, float],
    peaks: dict[str, float],
    group_size: int,
    world_size: int,
    reward_names: Sequence[str],
) -> dict[str, float]:
    """The logged metrics of one step from its (rank-reduced) sums and peaks: rewards, KL (where measured),
    lengths, timing, throughput, memory; the rollout/training mismatch where the engine sampled from other
    weights."""

    def total(key: str) -> float:
        return sums.get(key, peaks.get(key, 0.0))

    n = sums["num_sequences"]
    tokens = max(total("update/token_count"), 1.0)
    mean_reward = total("reward_sum/total") / n
    metrics = {
        # Each rank's loss is its share scaled up by the rank count (see policy_update): average them.
        "train/loss": sums["loss"] / world_size,
        "train/reward": mean_reward,
        "train/reward_std": max(total("reward_sq_sum/total") / n - mean_reward**2, 0.0) ** 0.5,
        "train/advantage_std": (total("advantage_sq_sum") / n) ** 0.5,
        "train/zero_std_groups": total("group_zero_std_count") / (n / group_size),
        # Only where the loss measured it (loss.beta > 0): beta=0 skips the reference forward, and a 0 logged
        # for it would read as "the policy has not moved from the reference".
        **({"train/kl": total("update/kl_sum") / tokens} if "update/kl_sum" in sums else {}),
        "train/clip_fraction": total("update/clipped_sum") / tokens,
        "train/completion_length": total("completion_length_sum") / n,
        "train/completion_length_max": peaks["completion_length_max"],
        "train/truncated_fraction": total("truncated_count") / n,
        # Special tokens an engine emitted despite suppression (cut out before any forward): should be 0.
        "train/suppressed_tokens": total("suppressed_tokens"),
        "time/rollout_s": total("rollout_seconds"),
        "time/reference_s": total("reference_seconds"),
        "time/update_s": peaks["update_seconds"],
        "throughput/generated_tokens_per_s": total("generated_tokens") / max(total("rollout_seconds"), 1e-9),
        "memory/rollout_peak_gb": peaks["rollout_peak_gb"],
        "memory/update_peak_gb": peaks["update_peak_gb"],
    }
    for name in reward_names:
        metrics[f"reward/{name}"] = total(f"reward_sum/{name}") / n
    if "update/mismatch_sum" in sums:  # the engine sampled from other weights than the training forward
        metrics["rollout/logprob_mismatch_mean"] = total("update/mismatch_sum") / tokens
        metrics["rollout/logprob_mismatch_max"] = peaks["update/mismatch_max"]
        if "update/is_truncated_sum" in sums:
            metrics["rollout/is_truncated_fraction"] = total("update/is_truncated_sum") / tokens
    metrics.update({key: value for key, value in peaks.items() if key.startswith("memory/")})  # phases
    return metrics
