"""Capture submodule outputs with forward hooks.

Fused attention kernels (SDPA, flash) never materialise attention probabilities, so
``output_attentions`` is unavailable or slow; MiniLM relations are instead computed from the
query/key/value projections, captured here, e.g. ``encoder.layer.5.attention.self.query`` (BERT)
or ``model.layers.11.self_attn.q_proj`` (Llama).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from torch import Tensor, nn

from kdistill.errors import ModelError


def resolve_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)``; an unknown path raises :class:`ModelError` with close names."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"{type(model).__name__} has no submodule {path!r}{hint}") from None


def _first_tensor(path: str, output: object) -> Tensor:
    """The output itself, or its first element if it is a tuple/list (or a dict-like output)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif isinstance(output, Mapping) and output:
        output = next(iter(output.values()))
    if not isinstance(output, Tensor):
        raise ModelError(f"submodule {path!r} returned {type(output).__name__}, not a tensor")
    return output


@contextmanager
def capture_outputs(model: nn.Module, paths: list[str]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of the submodules at ``paths`` during forwards inside the block.

    Yields a dict path -> output tensor (the first element for tuple outputs), filled by each
    forward; a module called several times keeps its last output. Tensors stay attached to the
    graph. The hooks are removed on exit, also when the block raises.

    >>> with capture_outputs(model, ["encoder.layer.5.attention.self.query"]) as out:
    ...     model(**batch)
    >>> q = out["encoder.layer.5.attention.self.query"]  # (B, L, H)
    """
    modules = {path: resolve_submodule(model, path) for path in dict.fromkeys(paths)}
    captured: dict[str, Tensor] = {}
    handles = []

    def make_hook(path: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            captured[path] = _first_tensor(path, output)

        return hook

    try:
        for path, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(path)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
