"""Teacher targets read from a top-k cache (``kdistill cache``) instead of a live teacher forward.

Yields, per batch, the cached top-k targets of the batch's examples (by ``example_ids``, never by
step), with teacher ids mapped into a trimmed student vocabulary when there is one (dropped ids
become unused slots, so their mass falls into the tail bucket of the sparse loss).
"""

from __future__ import annotations

from torch import Tensor

from kdistill.losses import SparseTargets
from kdistill.signals.cache import TeacherCache


class CachedTeacher:
    """A signal source over an open :class:`TeacherCache`; ``old_to_new``: teacher → student id map."""

    weights = [1.0]

    def __init__(self, cache: TeacherCache, old_to_new: Tensor | None = None) -> None:
        self.cache, self.old_to_new = cache, old_to_new

    def to(self, device) -> CachedTeacher:
        return self

    def __call__(self, inputs: dict[str, Tensor], hidden_states: bool, modules: list[str],
                 batch: dict[str, Tensor] | None = None) -> list[dict]:
        """[{"sparse": SparseTargets (B, L, k)}] for the batch (row j = the distribution of token j + 1)."""
        ids = batch["example_ids"].cpu()
        targets = self.cache.targets(ids, batch["input_ids"].shape[1])
        target_ids = targets.ids
        if self.old_to_new is not None:
            valid = target_ids >= 0
            target_ids = self.old_to_new[target_ids.clamp_min(0)].masked_fill(~valid, -1)
        device = batch["input_ids"].device
        return [{"sparse": SparseTargets(target_ids.to(device), targets.logprobs.to(device), targets.temperature)}]
