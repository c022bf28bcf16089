"""Live local teachers: one forward per batch under ``no_grad``.

The teachers are never trained, never wrapped in DDP and never saved with the student. With
several teachers (an ensemble, weights normalised to sum to 1), response terms see the mixture
of their distributions and feature/relation terms the weighted sum over teachers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from kdistill.models.outputs import forward_outputs


class LiveTeachers:
    """models: (model, weight) pairs; ``task`` as in the recipe."""

    def __init__(self, models: Iterable[tuple[nn.Module, float]], task: str, vocab_map: Tensor | None = None) -> None:
        pairs = list(models)
        total = sum(weight for _, weight in pairs)
        self.models = [model.eval().requires_grad_(False) for model, _ in pairs]
        self.weights = [weight / total for _, weight in pairs]
        self.task = task
        # a student with a trimmed vocabulary: its ids -> the teachers' ids (new_to_old)
        self.vocab_map = vocab_map

    def to(self, device: torch.device | str) -> LiveTeachers:
        self.models = [model.to(device) for model in self.models]
        if self.vocab_map is not None:
            self.vocab_map = self.vocab_map.to(device)
        return self

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Tensor], hidden_states: bool, modules: list[str],
                 batch: dict[str, Tensor] | None = None) -> list[dict]:
        """Each teacher's :func:`~kdistill.models.outputs.forward_outputs` for the batch."""
        if self.vocab_map is not None:
            inputs = {**inputs, "input_ids": self.vocab_map[inputs["input_ids"]]}
        return [forward_outputs(model, self.task, inputs, hidden_states, modules) for model in self.models]
