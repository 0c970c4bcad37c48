"""Third-party messages a vrft run does not act on, silenced by their exact text, each with the reason.

Everything here is upstream behaviour that vrft has already accounted for; a warning vrft can fix at its
cause is fixed there instead (the empty validation loop in `vrft.loggers`, the default checkpoint of the
warm start in `vrft.warmstart`).
"""

from __future__ import annotations

import logging
import warnings

# (message regex, why it does not apply to vrft)
IGNORED_WARNINGS = [
    # vrft writes checkpoints after the optimizer step on purpose (adapter + optimizer state of that step).
    ("Using ModelCheckpoint with manual optimization", "intended"),
    # peft asks for `ensure_weight_tying` when lm_head (tied to the input embeddings) is adapted, as the tiny
    # warm start does. vrft never merges into the shared matrix in place: the adapter is saved without
    # embeddings (`save_adapter`) and `vrft.export` unties lm_head before merging.
    (
        r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter",
        "handled in vrft.export",
    ),
    # peft 0.18 reads the deprecated property when wrapping a model (peft_model.py); fixed upstream in peft.
    (r"`is_gradient_checkpointing` is deprecated", "peft's call, not vrft's"),
    # Lightning 2.6's own pytree helper against torch 2.13 (lightning/pytorch/utilities/_pytree.py).
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "Lightning's call, not vrft's"),
]

# Lightning's advertisements for its cloud packages (logged at INFO on every Trainer), not warnings.
_TIPS = ("💡 Tip: For seamless cloud",)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIPS)


def silence_upstream_noise() -> None:
    """Install the filters above (idempotent)."""
    for message, _reason in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
