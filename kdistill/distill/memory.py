"""Give freed heap memory back to the operating system before a long phase.

Loading a teacher and building a student from it frees many mid-sized tensors; glibc keeps such
freed heap pages in the process (only allocations above its mmap threshold go back at once), so
the resident size during training would still count them. ``malloc_trim(0)`` returns them.
A no-op where the C library has no ``malloc_trim`` (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import gc


def return_free_memory() -> bool:
    """Collect garbage and trim the C heap; True if ``malloc_trim`` ran."""
    gc.collect()
    try:  # the process's own symbols, libc's among them: no library search (no subprocess)
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return False
    if trim is None:
        return False
    trim(0)
    return True
