"""KD losses: pure functions ``(student tensors, teacher targets, mask) -> scalar``.

Every loss sums a per-position value over valid positions and divides by ``num_valid``
(default: the valid positions of the call), in fp32. See ``docs/losses.md`` for the formulas.
"""

from kdistill.losses import feature, relation, response  # noqa: F401  (register their losses)
from kdistill.losses.chunked import (
    ChunkedTerm,
    EnsembleHiddenTargets,
    HiddenTargets,
    LMHead,
    chunked_distribution_loss,
    chunked_distribution_losses,
)
from kdistill.losses.reduce import mask_from_labels
from kdistill.losses.registry import LossEntry, all_losses, get_loss, register_loss
from kdistill.losses.response import SparseTargets, distribution_loss, per_position_divergence

__all__ = [
    "ChunkedTerm",
    "EnsembleHiddenTargets",
    "HiddenTargets",
    "LMHead",
    "LossEntry",
    "SparseTargets",
    "all_losses",
    "chunked_distribution_loss",
    "chunked_distribution_losses",
    "distribution_loss",
    "get_loss",
    "mask_from_labels",
    "per_position_divergence",
    "register_loss",
]
