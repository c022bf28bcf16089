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
from kdistill.models.precision import Precision, own_memory, set_inference_precision
from kdistill.models.vocab import VocabPlan, trim_model


class LiveTeachers:
    """models: (model, weight) pairs; ``task`` as in the recipe.

    vocab_plan: the plan of a student with a trimmed vocabulary. The teachers are then trimmed to
    the same kept ids (in place: input embeddings and head rows), so they read the student's ids
    and their distribution is renormalised over the kept tokens,
    ``p_T(v | kept) = exp(z_v) / Σ_{u kept} exp(z_u)``, without holding or multiplying the
    dropped rows (for Gemma 3: 262,144 → the corpus's tokens).

    dtypes: each teacher's inference precision (see :mod:`kdistill.models.precision`; None or
    float32: as loaded). A trimmed teacher, or one whose precision changed, is then copied out of
    the memory-mapped checkpoint (:func:`~kdistill.models.precision.own_memory`), so the pages of
    the rows and weights it no longer uses are not kept resident.
    """

    def __init__(self, models: Iterable[tuple[nn.Module, float]], task: str,
                 vocab_plan: VocabPlan | None = None, dtypes: Iterable[Precision | None] | None = None) -> None:
        pairs = list(models)
        precisions = list(dtypes) if dtypes is not None else [None] * len(pairs)
        if len(precisions) != len(pairs):
            raise ValueError(f"{len(pairs)} teachers but {len(precisions)} dtypes")
        total = sum(weight for _, weight in pairs)
        self.models = [self._prepare(model, vocab_plan, dtype) for (model, _), dtype in zip(pairs, precisions)]
        self.weights = [weight / total for _, weight in pairs]
        self.task = task

    @staticmethod
    def _prepare(model: nn.Module, vocab_plan: VocabPlan | None, dtype: Precision | None) -> nn.Module:
        if vocab_plan is not None:
            model = trim_model(model, vocab_plan)
        model = set_inference_precision(model, dtype)  # None or float32: unchanged
        if vocab_plan is not None or dtype not in (None, "float32"):
            model = own_memory(model)
        return model.eval().requires_grad_(False)

    def to(self, device: torch.device | str) -> LiveTeachers:
        self.models = [model.to(device) for model in self.models]
        return self

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Tensor], hidden_states: bool, modules: list[str],
                 batch: dict[str, Tensor] | None = None) -> list[dict]:
        """Each teacher's :func:`~kdistill.models.outputs.forward_outputs` for the batch."""
        return [forward_outputs(model, self.task, inputs, hidden_states, modules) for model in self.models]
