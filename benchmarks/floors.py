"""Lower bounds on a training step's time and memory, from the work it must do.

A step that does F floating-point operations in matmuls cannot take less than F / R seconds on a
machine whose best matmul rate is R FLOP/s; a step that holds the teacher's weights and the
student's weights, gradients and Adam moments cannot peak below their bytes plus the process's
own footprint. ``benchmarks/llm_kd.py`` reports both next to what it measures, so a target that
no trainer can reach at the same precision shows as such.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch import nn


def count_flops(run: Callable[[], object]) -> int:
    """FLOPs of the matmuls (mm, addmm, bmm, conv) that ``run()`` executes, backward included.

    Kernels torch has no formula for count 0 (among them CPU flash attention: ~4% of a Gemma step
    at 128 tokens), so the count is a floor too."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def gemm_shapes(hidden: int, widths: Iterable[int], rows: int) -> list[tuple[int, int, int, bool]]:
    """(m, k, n, transposed A) of a layer's forward, input-gradient and weight-gradient GEMMs.

    For each projection H → W over ``rows`` positions: (rows, H)·(H, W), (rows, W)·(W, H) and
    (H, rows)·(rows, W), the last with A a transposed view as autograd makes it."""
    shapes = []
    for width in widths:
        shapes += [(rows, hidden, width, False), (rows, width, hidden, False), (hidden, rows, width, True)]
    return shapes


def gemm_rate(shapes: Iterable[tuple[int, int, int, bool]], dtype: torch.dtype = torch.float32,
              repeats: int = 5) -> float:
    """The best rate (FLOP/s, 2·m·k·n per GEMM) over ``shapes``, each timed ``repeats`` times after a warm-up.

    The best shape and the fastest repeat are taken, so F / rate is a floor, not an estimate."""
    best = 0.0
    for m, k, n, transposed in shapes:
        a = torch.randn(k, m, dtype=dtype).t() if transposed else torch.randn(m, k, dtype=dtype)
        b = torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)
        fastest = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            fastest = min(fastest, time.perf_counter() - start)
        best = max(best, 2 * m * k * n / fastest)
    return best


def tensor_bytes(*modules: nn.Module) -> int:
    """Bytes of the modules' parameters and buffers (a tensor shared within or between them once)."""
    seen, total = set(), 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def training_state_bytes(student: nn.Module, frozen: Iterable[nn.Module] = ()) -> int:
    """Bytes resident at a ``torch.optim.AdamW`` step: the student's tensors, a gradient and two
    moments (each in the parameter's dtype, as torch allocates them) per trainable parameter, and
    the ``frozen`` modules (teachers)' tensors.

        bytes = |student| + 3 · Σ_trainable |p| + Σ_frozen |t|"""
    trainable = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
    return tensor_bytes(student, *frozen) + 3 * trainable
