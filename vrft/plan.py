"""`python -m vrft.plan`: predict a training run's peak GPU memory from its config, before loading anything.

Takes exactly the overrides `python -m vrft.train` takes (`+hw=rtx4090 model=qwen2vl-7b precision=int4 ...`),
prints the plan by component and phase, whether it fits the hardware profile's budget, and the change
that makes it fit. Exit status 0 when it fits (or no budget is known), 1 when it does not.
"""

from __future__ import annotations

import sys

import hydra
from hydra.utils import get_class
from omegaconf import DictConfig

from vrft.cli import check_composes, user_errors
from vrft.distributed import check_optimizer, check_plan_settings, check_strategy
from vrft.paths import config_dir
from vrft.planner.planning import cards_needed, resolve_auto, verdict
from vrft.planner.report import format_cards, format_verdict
from vrft.validation import validate

CARD_GB = 24.0  # the card size the "cards needed" line counts in (RTX 4090 / 3090)
# The plan writes no run folder or log file: it only reads the config.
QUIET_HYDRA = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@user_errors
def main(cfg: DictConfig) -> None:
    """Hydra entry point: print the plan; exit 1 if it does not fit the budget."""
    validate(cfg)  # the settings check `vrft.train` runs first: a wrong type is named, not a TypeError
    check_plan_settings(cfg)
    cfg = resolve_auto(cfg)
    result = verdict(cfg)
    print(format_verdict(cfg, result))
    try:  # what `vrft.train` refuses before loading (any strategy may be planned, on paper)
        check_strategy(cfg.trainer, cfg.precision)
        check_optimizer(cfg)
    except ValueError as error:
        print(f"  note: on paper only, vrft.train stops this run before loading: {error}")
    plugin = get_class(cfg.precision._target_)
    refusal = (
        None if getattr(plugin, "fsdp_variant", None) else getattr(plugin, "fsdp_refusal", "no FSDP form")
    )
    print(format_cards(cards_needed(cfg, CARD_GB), CARD_GB, refusal))
    if not result.fits:
        sys.exit(1)


if __name__ == "__main__":
    sys.argv += [arg for arg in QUIET_HYDRA if arg.split("=")[0] not in " ".join(sys.argv)]
    user_errors(check_composes)("train", sys.argv[1:])
    main()
