"""return_free_memory gives freed heap pages back to the OS (Linux with glibc)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from kdistill.distill.memory import return_free_memory


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_heap_memory_goes_back_to_the_os() -> None:
    # 196 MB of 64 kB blocks (below glibc's mmap threshold: heap), each followed by a 1 kB block
    # that stays, so the freed ones are holes inside the heap that free() alone does not return
    blocks, pins = [], []
    for _ in range(3000):
        blocks.append(bytearray(b"x" * 65536))
        pins.append(bytearray(b"y" * 1024))
    del blocks
    before = _rss()
    assert return_free_memory()
    after = _rss()
    assert before - after > 100 * 2**20, (before, after)
    del pins
