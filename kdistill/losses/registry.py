"""Registry from a recipe's loss ``kind`` to the loss function that computes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kdistill.errors import ConfigError


@dataclass(frozen=True)
class LossEntry:
    """One registered loss: its recipe ``kind``, family, formula (for docs and ``kdistill losses``)."""

    kind: str
    family: str  # "response" | "feature" | "relation"
    formula: str
    fn: Callable


_REGISTRY: dict[str, LossEntry] = {}


def register_loss(kind: str, *, family: str, formula: str) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` available to recipes as ``kind``."""

    def add(fn: Callable) -> Callable:
        if kind in _REGISTRY:
            raise ValueError(f"loss kind {kind!r} is registered twice")
        _REGISTRY[kind] = LossEntry(kind, family, formula, fn)
        return fn

    return add


def get_loss(kind: str) -> LossEntry:
    """The entry for ``kind``; an unknown kind is a :class:`ConfigError` listing the known ones."""
    import kdistill.losses  # noqa: F401  (registers every loss)

    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ConfigError(f"unknown loss kind {kind!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def all_losses() -> list[LossEntry]:
    """Every registered loss, by family then kind."""
    import kdistill.losses  # noqa: F401

    return sorted(_REGISTRY.values(), key=lambda e: (e.family, e.kind))
