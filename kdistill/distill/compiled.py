"""``training.compile``: run the student's and the live teachers' forwards through ``torch.compile``.

The compiled module of each model is the one :func:`kdistill.models.outputs.forward_outputs`
calls (:func:`~kdistill.models.outputs.forward_module`): a causal LM's body (``base_model``: the loss makes the logits chunk by chunk from its
output), any other model whole. Compiled in place (``nn.Module.compile``), so parameters, state
dict and DDP wrapping are unchanged. Evaluation runs eager (:func:`eager_forward`: its batch
shapes and grad mode would compile again), and :func:`uncompile` restores the eager forward
before export.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from kdistill.models.outputs import forward_module


def compile_forward(model: nn.Module, task: str) -> nn.Module:
    """Compile ``model``'s forward as the trainer runs it, in place; returns the compiled module."""
    target = forward_module(model, task)
    target.compile()
    return target


def uncompile(module: nn.Module) -> None:
    """Undo :meth:`nn.Module.compile`: calls run the module's eager forward again."""
    module._compiled_call_impl = None


def eager_forward(compiled: bool) -> AbstractContextManager:
    """A context in which compiled code runs eagerly (a no-op when nothing was compiled)."""
    return torch.compiler.set_stance("force_eager") if compiled else nullcontext()
