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
from kdistill.losses.feature import FeatureProjections, LayerPair, hidden_cosine, hidden_mse
from kdistill.losses.reduce import mask_from_labels
from kdistill.losses.registry import LossEntry, all_losses, get_loss, register_loss
from kdistill.losses.relation import attention_relation_kl, rkd_angle, rkd_distance, similarity_preserving
from kdistill.losses.response import (
    DistributionSpec,
    SparseTargets,
    distribution_loss,
    mixture_logits,
    per_position_divergence,
)

__all__ = [
    "ChunkedTerm",
    "DistributionSpec",
    "EnsembleHiddenTargets",
    "FeatureProjections",
    "HiddenTargets",
    "LMHead",
    "LayerPair",
    "LossEntry",
    "SparseTargets",
    "all_losses",
    "attention_relation_kl",
    "chunked_distribution_loss",
    "chunked_distribution_losses",
    "distribution_loss",
    "get_loss",
    "hidden_cosine",
    "hidden_mse",
    "mask_from_labels",
    "mixture_logits",
    "per_position_divergence",
    "register_loss",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
]
