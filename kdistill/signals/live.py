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
from kdistill.models.vocab import VocabPlan, trim_model


class LiveTeachers:
    """models: (model, weight) pairs; ``task`` as in the recipe.

    vocab_plan: the plan of a student with a trimmed vocabulary. The teachers are then trimmed to
    the same kept ids (in place: input embeddings and head rows), so they read the student's ids
    and their distribution is renormalised over the kept tokens,
    ``p_T(v | kept) = exp(z_v) / Σ_{u kept} exp(z_u)``, without holding or multiplying the
    dropped rows (for Gemma 3: 262,144 → the corpus's tokens).
    """

    def __init__(self, models: Iterable[tuple[nn.Module, float]], task: str,
                 vocab_plan: VocabPlan | None = None) -> None:
        pairs = list(models)
        total = sum(weight for _, weight in pairs)
        self.models = [(model if vocab_plan is None else trim_model(model, vocab_plan)).eval().requires_grad_(False)
                       for model, _ in pairs]
        self.weights = [weight / total for _, weight in pairs]
        self.task = task

    def to(self, device: torch.device | str) -> LiveTeachers:
        self.models = [model.to(device) for model in self.models]
        return self

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Tensor], hidden_states: bool, modules: list[str],
                 batch: dict[str, Tensor] | None = None) -> list[dict]:
        """Each teacher's :func:`~kdistill.models.outputs.forward_outputs` for the batch."""
        return [forward_outputs(model, self.task, inputs, hidden_states, modules) for model in self.models]
