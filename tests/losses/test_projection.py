"""The vocabulary-blocked head GEMM equals one GEMM."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.losses.projection import HEAD_BLOCK_CPU, project_into


@pytest.mark.parametrize("bias", [False, True])
def test_blocked_head_projection_equals_one_gemm(bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    vocab = 2 * HEAD_BLOCK_CPU + 904  # more than two blocks and a partial last one
    hidden, weight = torch.randn(5, 12, generator=g), torch.randn(vocab, 12, generator=g)
    b = torch.randn(vocab, generator=g) if bias else None
    out = torch.full((5, vocab), math.nan)
    assert project_into(hidden, weight, b, out) is out
    expected = hidden @ weight.t() + (b if bias else 0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
