"""`precision=auto`: the config node that stands for "the most precise mode that fits". The planner
(`vrft.planner.planning.resolve_precision`) replaces it before anything is built, and logs why."""

from __future__ import annotations

AUTO_ORDER = ("bf16", "int8", "mixed", "int4")  # most precise first, as users are advised to try them


class AutoPrecision:
    """`precision=auto`: stands for the mode `resolve_precision` picks before anything is instantiated."""

    name = "auto"

    def __init__(self, candidates=AUTO_ORDER):
        raise ValueError(
            "precision=auto must be resolved before the plugin is built (vrft.train and vrft.plan do it); "
            f"pick one of {', '.join(candidates)} when instantiating the config yourself"
        )
