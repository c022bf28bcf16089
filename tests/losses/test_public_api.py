"""What ``kdistill.losses`` offers at the package level, as the README and docs/losses.md name it."""

from __future__ import annotations

import kdistill.losses as losses


def test_every_name_in_all_is_importable() -> None:
    missing = [name for name in losses.__all__ if not hasattr(losses, name)]
    assert not missing


def test_feature_and_relation_losses_are_importable_from_the_package() -> None:
    """Response losses go through ``distribution_loss(kind=...)``; the others are functions of their own."""
    for entry in losses.all_losses():
        if entry.family in ("feature", "relation"):
            assert getattr(losses, entry.fn.__name__) is entry.fn, entry.kind
    for name in ("DistributionSpec", "mixture_logits", "LayerPair", "FeatureProjections"):  # docs/losses.md
        assert name in losses.__all__
