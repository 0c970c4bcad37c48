"""`python -m vrft.plan`: predict a training run's peak GPU memory from its config, before loading anything.

Takes exactly the overrides `python -m vrft.train` takes (`+hw=rtx4090 model=qwen2vl-7b precision=int4 ...`),
prints the plan by component and phase, whether it fits the hardware profile's budget, and the change
that makes it fit. Exit status 0 when it fits (or no budget is known), 1 when it does not.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from vrft.cli import user_errors
from vrft.paths import config_dir
from vrft.planner.planning import resolve_auto, verdict
from vrft.planner.report import format_verdict

# The plan writes no run folder or log file: it only reads the config.
QUIET_HYDRA = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@user_errors
def main(cfg: DictConfig) -> None:
    """Hydra entry point: print the plan; exit 1 if it does not fit the budget."""
    cfg = resolve_auto(cfg)
    result = verdict(cfg)
    print(format_verdict(cfg, result))
    if not result.fits:
        sys.exit(1)


if __name__ == "__main__":
    sys.argv += [arg for arg in QUIET_HYDRA if arg.split("=")[0] not in " ".join(sys.argv)]
    main()
