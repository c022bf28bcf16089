"""Transformer layer stacks, found by inspection, and choices of teacher layers for a student."""

from __future__ import annotations

from typing import Literal

from torch import nn

from kdistill.errors import ConfigError, ModelError

Strategy = Literal["every_other", "uniform", "first", "explicit"]

LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
"""Config fields that may hold the number of transformer blocks, in order of preference."""


def text_config(model: nn.Module):
    """The config describing the language model (``text_config`` of multimodal models)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError(f"{type(model).__name__} has no config")
    get_text = getattr(config, "get_text_config", None)
    if get_text is not None:
        return get_text()
    return getattr(config, "text_config", None) or config


def config_layer_count(config) -> int | None:
    """The layer count of a config, from the first of :data:`LAYER_COUNT_FIELDS` it has."""
    for field in LAYER_COUNT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module path and the :class:`~torch.nn.ModuleList` of the model's transformer blocks.

    Candidates are ModuleLists whose children all share one class and whose length equals the
    config's layer count; among several, the one holding the most parameters (then the first
    found) wins. Without a layer count in the config, the longest such list is taken.
    """
    count = config_layer_count(text_config(model))
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if count is None or len(module) == count:
                candidates.append((name, module))
    if not candidates:
        wanted = f"of {count} identical blocks" if count is not None else "of identical blocks"
        raise ModelError(f"cannot find the layer stack of {type(model).__name__}: no nn.ModuleList {wanted}")

    def size(item: tuple[str, nn.ModuleList]) -> tuple[int, int]:
        return len(item[1]), sum(p.numel() for p in item[1].parameters())

    best = max(size(c) for c in candidates)
    return next(c for c in candidates if size(c) == best)


def select_layers(
    num_teacher_layers: int,
    strategy: Strategy,
    num_layers: int | None = None,
    layers: list[int] | None = None,
) -> list[int]:
    """Indices of the teacher layers a student keeps, strictly increasing.

    ``every_other``: 0, 2, 4, ...; ``uniform``: ``num_layers`` indices spread over the depth,
    first and last included; ``first``: the first ``num_layers``; ``explicit``: ``layers``.
    """
    n = num_teacher_layers
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"the teacher must have at least one layer, not {n!r}")
    if layers is not None and strategy != "explicit":
        raise ConfigError(f"layers applies only to strategy 'explicit', not {strategy!r}")
    if strategy == "every_other":
        chosen = list(range(0, n, 2))
        if num_layers is not None and num_layers != len(chosen):
            raise ConfigError(f"num_layers {num_layers} disagrees with strategy 'every_other' ({len(chosen)} layers)")
        return chosen
    if strategy in ("uniform", "first"):
        count = _check_num_layers(num_layers, n, strategy)
        if strategy == "first":
            return list(range(count))
        if count == 1:
            return [n - 1]
        return [round(i * (n - 1) / (count - 1)) for i in range(count)]
    if strategy == "explicit":
        if layers is None:
            raise ConfigError("strategy 'explicit' needs layers")
        chosen = list(layers)
        if not chosen:
            raise ConfigError("layers must not be empty")
        for index in chosen:
            if isinstance(index, bool) or not isinstance(index, int):
                raise ConfigError(f"layer index {index!r} is not an integer")
            if not 0 <= index < n:
                raise ConfigError(f"layer index {index} out of range for a teacher with {n} layers")
        if any(b <= a for a, b in zip(chosen, chosen[1:])):
            raise ConfigError(f"layers must be strictly increasing, not {chosen}")
        if num_layers is not None and num_layers != len(chosen):
            raise ConfigError(f"num_layers {num_layers} disagrees with the {len(chosen)} layers given")
        return chosen
    raise ConfigError(f"layer strategy {strategy!r} is not one of every_other, uniform, first, explicit")


def _check_num_layers(num_layers: int | None, n: int, strategy: str) -> int:
    if num_layers is None:
        raise ConfigError(f"strategy {strategy!r} needs num_layers")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ConfigError(f"num_layers must be a positive integer, not {num_layers!r}")
    if num_layers > n:
        raise ConfigError(f"num_layers {num_layers} exceeds the teacher's {n} layers")
    return num_layers
