"""Give freed heap memory back to the operating system: before training, and within its steps.

glibc keeps freed heap chunks in the process: only allocations above its mmap threshold (which
grows to 32 MiB as large blocks are freed) go back at once. ``malloc_trim(0)`` returns every free
page of the heap. Where the C library has no ``malloc_trim`` (macOS, musl, Windows) it is a no-op.

- :func:`return_free_memory`: once, before a long phase (what loading the teacher and building
  the student freed).
- :class:`HeapTrims` (``training.trim_heap``, opt-in): at fixed points of every training step.
  A step frees and makes again hundreds of tensors of mixed sizes (activations, their gradients,
  the loss's buffers); where a new tensor fits no freed hole the heap grows, so the resident size
  climbs above what is in use. Trimming before the step's high points keeps it near what is in use,
  at the cost of the page faults of freed pages that are used again.
"""

from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Callable, Iterable

from torch import Tensor, is_grad_enabled, nn

from kdistill.errors import KdistillError
from kdistill.models.layers import find_layer_stack


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """libc's ``malloc_trim``, looked up once; None where there is none."""
    try:  # the process's own symbols, libc's among them: no library search (no subprocess)
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def trim_heap() -> bool:
    """``malloc_trim(0)``: give the C heap's free pages back; True if it ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def return_free_memory() -> bool:
    """Collect garbage and trim the C heap; True if ``malloc_trim`` ran."""
    gc.collect()
    return trim_heap()


class HeapTrims:
    """Trim the heap at the high points of a training step, through hooks.

    Points: the end of each model body's forward (the student's, then each live teacher's: the loss
    comes next), and in backward each time the gradient of a student layer's output arrives (before
    that layer's backward makes its gradients); with ``hooks=False`` (compiled models) none of
    these. The trainer adds the start of each step (:meth:`trim`). The computation is unchanged
    (same losses and weights, bit for bit).

    Measured on the trimmed Gemma student of ``benchmarks/llm_kd.py`` (2 cores, 60 steps,
    ``--trim-heap``; ``benchmarks/results/llm_kd-trim-heap.json``), two runs on different days:
    peak RSS 1.72 → 1.46 / 1.48 GiB from the cache, 2.21 → 1.91 / 1.93 GiB with the live teacher.
    Cost, paired within one run (trimming on every other step; ``benchmarks/heap_trim_cost.py``):
    +0.35–0.36 s a step, 20% from the cache (1.81 → 2.17 s), 10% with the live teacher (3.76 → 4.22 s).
    """

    def __init__(self, student: nn.Module, teachers: Iterable[nn.Module] = (), *, hooks: bool = True) -> None:
        self.count = 0
        self._handles = []
        if not hooks:  # compiled models: a hook inside one would split its graph
            return
        # the body (``base_model``): what kdistill runs for a causal LM, and inside any model's forward
        bodies = [getattr(m, "base_model", m) for m in (student, *teachers)]
        self._handles = [body.register_forward_hook(self._after_forward) for body in bodies]
        try:
            _, layers = find_layer_stack(student)
        except KdistillError:
            layers = nn.ModuleList()  # no layer stack: the forward ends and step starts only
        self._handles += [layer.register_forward_hook(self._on_layer_output) for layer in layers]

    def trim(self) -> None:
        self.count += 1
        trim_heap()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _after_forward(self, module: nn.Module, args, output) -> None:
        self.trim()

    def _on_layer_output(self, module: nn.Module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if is_grad_enabled() and isinstance(hidden, Tensor) and hidden.requires_grad:
            hidden.register_hook(self._before_layer_backward)

    def _before_layer_backward(self, grad: Tensor) -> None:
        self.trim()
