"""Output-head GEMM into a given buffer, blocked over the vocabulary on a CPU.

``out (n, V) = hidden (n, H) · weight (V, H)ᵀ + bias``. On a CPU one GEMM writing a whole
(n, V) output runs well below the GEMM's speed on a cache-sized output, so the product is made
:func:`head_block` vocabulary rows at a time into a small (n, b) buffer (≤ 4 MiB, it stays in
cache: b = 2048 up to n = 512 rows, then halved as n doubles, at least 512) and copied out.
Measured on 2 cores, fp32, V = 262,144, H = 640:

| rows n | one GEMM | blocked | |
|---|---|---|---|
| 128 | 0.463 s | 0.315 s | medians of 5 |
| 512 | 1.54 s | 1.12 s | medians of 5 |
| 1,024 | 2.83–2.91 s | 1.84–1.87 s (b = 1024; 1.94–2.09 s with b = 2048) | 2 runs |
| 920 at V = 18,905 (a trimmed head) | 0.20 s | 0.13 s (b = 1024; 0.15 s with b = 2048) | medians of 5 |

On other devices: one GEMM.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

HEAD_BLOCK_CPU = 2048  # vocabulary rows per GEMM on a CPU, up to 512 hidden rows
HEAD_BLOCK_BYTES = 4 * 2**20  # the block buffer's size beyond that


def head_block(rows: int, itemsize: int = 4) -> int:
    """Vocabulary rows per GEMM on a CPU for ``rows`` hidden rows: ``HEAD_BLOCK_CPU``, or fewer
    (a power of two ≥ 512) so that the (rows, block) buffer stays within ``HEAD_BLOCK_BYTES``."""
    block = HEAD_BLOCK_CPU
    while block > 512 and rows * block * itemsize > HEAD_BLOCK_BYTES:
        block //= 2
    return block


def matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``hidden @ weight.t()`` computes in here: autocast's if it is on for the device
    (e.g. bf16 mixed precision), else the promoted type of the two."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def logits_dtype(matmul: torch.dtype) -> torch.dtype:
    """The dtype logits are kept in for element-wise work: at least fp32 (bf16/fp16 GEMMs write fp32)."""
    return torch.promote_types(matmul, torch.float32)


def project_into(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor,
                 dtype: torch.dtype | None = None) -> Tensor:
    """Write ``hidden · weightᵀ + bias`` into ``out`` (n, V) and return it (no autograd); computed
    in ``dtype`` (default ``out.dtype``; inputs cast to it, a block of the weight at a time) and
    stored in ``out.dtype`` (e.g. bf16 GEMMs, fp32 logits)."""
    vocab, dtype = weight.shape[0], dtype or out.dtype
    hidden = hidden.to(dtype)
    if out.device.type != "cpu" or not is_blocked(hidden.shape[0], vocab, hidden.element_size()):
        weight = weight.to(dtype)
        target = out if out.dtype == dtype else None
        if bias is None:
            product = torch.mm(hidden, weight.t(), out=target)
        else:
            product = torch.addmm(bias.to(dtype), hidden, weight.t(), out=target)
        return out if target is not None else out.copy_(product)
    for v0, v1, part in head_blocks(hidden, weight, bias):
        out[:, v0:v1].copy_(part)
    return out


def is_blocked(rows: int, vocab: int, itemsize: int = 4) -> bool:
    """Whether a CPU head over ``vocab`` rows is computed in :func:`head_blocks` (more than two blocks)."""
    return vocab > 2 * head_block(rows, itemsize)


def head_blocks(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Iterator[tuple[int, int, Tensor]]:
    """``(v0, v1, hidden · weight[v0:v1]ᵀ + bias[v0:v1])`` for consecutive :func:`head_block`-wide
    blocks of the vocabulary, each (n, v1 − v0) in ``hidden.dtype`` and written into one reused
    buffer (valid until the next block)."""
    vocab, dtype = weight.shape[0], hidden.dtype
    step = head_block(hidden.shape[0], hidden.element_size())
    block = torch.empty((hidden.shape[0], step), dtype=dtype, device=hidden.device)
    for v0 in range(0, vocab, step):
        v1 = min(v0 + step, vocab)
        part, rows = block[:, : v1 - v0], weight[v0:v1].to(dtype)
        if bias is None:
            torch.mm(hidden, rows.t(), out=part)
        else:
            torch.addmm(bias[v0:v1].to(dtype), hidden, rows.t(), out=part)
        yield v0, v1, part
