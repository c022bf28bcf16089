"""Give one module a behaviour by swapping its class for a cached subclass (lean activations, bf16 teachers)."""

from __future__ import annotations

from torch import nn

_SUBCLASSES: dict[tuple[type, type], type] = {}  # (mixin, original class) -> their subclass


def swap_in(module: nn.Module, mixin: type, prefix: str) -> None:
    """Make ``module`` an instance of ``(mixin, type(module))``, named ``prefix`` + its class name.

    One subclass per (mixin, class), cached: no per-module closure and no reference cycle, and a
    deep copy of the module keeps the behaviour. The subclass's ``_kdistill_original`` is the class
    it replaced (``module.__class__ = type(module)._kdistill_original`` undoes the swap).
    """
    cls = type(module)
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{prefix}{cls.__name__}", (mixin, cls), {"_kdistill_original": cls})
    module.__class__ = _SUBCLASSES[key]
