"""Masking and normalisation shared by every loss.

Every loss in kdistill reduces the same way: the sum of a per-position value over the *valid*
positions, divided by a count the caller may pass in. A training loop passes the global number
of valid tokens across accumulation steps and ranks, so that summing micro-batch losses gives
the loss of the whole batch (gradient-accumulation invariance). Left to the default, the count
is the number of valid positions in this call; it is clamped to at least 1 so that a fully
masked input gives 0 (with a connected graph), never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdistill.errors import ShapeError

IGNORE_INDEX = -100


def mask_from_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Boolean mask of positions whose label is not ``ignore_index``. Shape: as ``labels``."""
    return labels != ignore_index


def check_mask(mask: Tensor | None, lead_shape: torch.Size, what: str) -> Tensor | None:
    """Validate that ``mask`` (bool) has the leading shape of the tensor it masks."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(lead_shape):
        raise ShapeError(f"{what}: mask has shape {tuple(mask.shape)}, expected {tuple(lead_shape)}")
    return mask.bool()


def select_valid(x: Tensor, mask: Tensor | None, lead_ndim: int) -> Tensor:
    """Flatten the ``lead_ndim`` leading dims of ``x`` and keep the valid rows.

    ``x``: (*lead, *rest) -> (N_valid, *rest); ``mask``: (*lead) bool or None (all valid).
    Only the valid rows are copied, so padding costs no compute downstream.
    """
    flat = x.reshape(-1, *x.shape[lead_ndim:])
    if mask is None:
        return flat
    return flat[mask.reshape(-1)]


def normalise(total: Tensor, num_valid: Tensor | float | int | None, default_count: int) -> Tensor:
    """``total / max(count, 1)`` where count is ``num_valid`` if given, else ``default_count``."""
    count = default_count if num_valid is None else num_valid
    count_t = torch.as_tensor(count, dtype=torch.float32, device=total.device)
    return total / count_t.clamp_min(1.0)
