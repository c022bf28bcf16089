"""The vocabulary-blocked head GEMM equals one GEMM."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.losses.projection import HEAD_BLOCK_BYTES, HEAD_BLOCK_CPU, head_block, project_into


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


def test_head_block_keeps_the_buffer_small_for_many_rows() -> None:
    assert head_block(1) == head_block(512) == HEAD_BLOCK_CPU
    assert head_block(1024) == 1024 and head_block(2048) == 512 and head_block(10**6) == 512
    assert head_block(1024, itemsize=2) == HEAD_BLOCK_CPU
    for rows in (513, 1024, 4096):
        assert rows * head_block(rows) * 4 <= HEAD_BLOCK_BYTES or head_block(rows) == 512


def test_blocked_head_projection_with_many_rows_equals_one_gemm() -> None:
    g = torch.Generator().manual_seed(1)
    rows, vocab = 2100, 3 * 512 + 77  # blocks of 512 vocabulary rows, a partial last one
    assert head_block(rows) == 512  # so this vocabulary takes the blocked path
    hidden, weight = torch.randn(rows, 8, generator=g), torch.randn(vocab, 8, generator=g)
    out = torch.full((rows, vocab), math.nan)
    project_into(hidden, weight, None, out)
    torch.testing.assert_close(out, hidden @ weight.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab", [50, 2 * HEAD_BLOCK_CPU + 904])  # one GEMM; vocabulary-blocked
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_gemm_into_fp32_logits(vocab: int, bias: bool) -> None:
    """dtype=bf16 with an fp32 ``out``: the bf16 GEMM's own result, stored in fp32 (no fp32 GEMM)."""
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(5, 12, generator=g), torch.randn(vocab, 12, generator=g)
    b = torch.randn(vocab, generator=g) if bias else None
    out = torch.full((5, vocab), math.nan)
    assert project_into(hidden, weight, b, out, dtype=torch.bfloat16) is out
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    expected = (h16 @ w16.t() if b is None else torch.addmm(b.bfloat16(), h16, w16.t())).float()
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert not torch.equal(out, project_into(hidden, weight, b, torch.empty(5, vocab)))  # fp32 GEMM differs
