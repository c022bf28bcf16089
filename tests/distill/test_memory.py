"""return_free_memory gives freed heap pages back to the OS (Linux with glibc); HeapTrims trims
at a training step's high points."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from kdistill.distill.memory import HeapTrims

_HOLES = """
import sys
from pathlib import Path
from kdistill.distill.memory import return_free_memory

def rss():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024

# 196 MB of 64 kB blocks (below glibc's mmap threshold: heap), each followed by a 1 kB block
# that stays, so the freed ones are holes inside the heap that free() alone does not return
blocks, pins = [], []
for _ in range(3000):
    blocks.append(bytearray(b"x" * 65536))
    pins.append(bytearray(b"y" * 1024))
del blocks
before = rss()
assert return_free_memory()
print(before - rss())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_heap_memory_goes_back_to_the_os() -> None:
    """In a fresh interpreter: earlier tests' heap (freed holes, glibc's adapted mmap threshold)
    decides where the blocks go, and made the drop flaky in the full suite."""
    result = subprocess.run([sys.executable, "-c", _HOLES], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 100 * 2**20, result.stdout


def _tiny_llama(layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def test_heap_trims_after_each_body_forward_and_before_each_layer_backward() -> None:
    student, teacher = _tiny_llama(3), _tiny_llama(2)
    trims = HeapTrims(student, [teacher])
    ids = torch.randint(0, 64, (2, 5))
    hidden = student.base_model(input_ids=ids).last_hidden_state
    assert trims.count == 1  # the student body's end
    with torch.no_grad():
        teacher.base_model(input_ids=ids)
    assert trims.count == 2  # the teacher's: its layers' outputs need no gradient, so no backward points
    hidden.pow(2).sum().backward()
    assert trims.count == 2 + 3  # before each of the student's 3 layers' backward
    with torch.no_grad():
        student(input_ids=ids)  # the whole model runs its body once
    assert trims.count == 6
    trims.remove()
    student.base_model(input_ids=ids).last_hidden_state.sum().backward()
    assert trims.count == 6


def test_heap_trims_without_a_layer_stack_trim_after_the_forward_only() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    trims = HeapTrims(model)
    model(torch.randn(3, 4)).sum().backward()
    assert trims.count == 1
    trims.trim()
    assert trims.count == 2


def test_heap_trims_without_hooks_for_compiled_models() -> None:
    """``hooks=False`` (``training.compile``): no hook inside a model, where it would split the graph."""
    student, teacher = _tiny_llama(3), _tiny_llama(2)
    trims = HeapTrims(student, [teacher], hooks=False)
    ids = torch.randint(0, 64, (2, 5))
    student.base_model(input_ids=ids).last_hidden_state.pow(2).sum().backward()
    with torch.no_grad():
        teacher.base_model(input_ids=ids)
    assert trims.count == 0
    assert not any(m._forward_hooks for model in (student, teacher) for m in model.modules())
    trims.trim()  # the step's start
    assert trims.count == 1
