"""Top-k record encoding: exact ids, log-probs within the documented bound, size, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdistill.errors import ConfigError, DataError, ShapeError
from kdistill.signals.encoding import TopKFormat, bytes_per_token, decode_topk, encode_topk, error_bound


def _sorted(ids: torch.Tensor, lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.from_numpy(np.argsort(-lp.double().numpy(), axis=1, kind="stable"))
    return ids.gather(1, order), lp.gather(1, order)


def _check_round_trip(ids: torch.Tensor, lp: torch.Tensor, vocab: int, log_tail: torch.Tensor | None = None) -> None:
    n, k = ids.shape
    packed = encode_topk(ids, lp, vocab, log_tail=log_tail)
    assert packed.dtype == torch.uint8 and packed.shape == (n, bytes_per_token(k, vocab))
    got_ids, got_lp = decode_topk(packed, k, vocab)
    want_ids, want_lp = _sorted(ids, lp)
    assert torch.equal(got_ids, want_ids)
    assert got_lp.dtype == torch.float32
    err = (got_lp.double() - want_lp.double()).abs()
    bound = error_bound(want_lp, k, vocab) + 1e-5 + 1e-6 * want_lp.double().abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"


@st.composite
def _topk_batches(draw):
    vocab = draw(st.one_of(st.integers(1, 300), st.integers(301, 300_000), st.sampled_from([2, 97, 262_144, 151_936])))
    k = draw(st.integers(1, min(vocab, 70)))
    n = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    spread = draw(st.floats(0.1, 8.0))
    tail_frac = draw(st.sampled_from([0.0, 1e-9, 1e-3, 0.3, 0.9, 0.9999]))
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)])
    ids[0, 0] = 0  # the extremes of the id range
    ids[-1, -1] = vocab - 1 if (k > 1 or n > 1 or vocab == 1) else ids[-1, -1]
    logits = rng.normal(0.0, spread, size=(n, k))
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True)) + math.log1p(-tail_frac)
    return torch.from_numpy(ids), torch.from_numpy(lp).float(), vocab


@settings(max_examples=60, deadline=None)
@given(_topk_batches())
def test_round_trip_ids_exact_logprobs_within_bound(batch):
    ids, lp, vocab = batch
    _check_round_trip(ids, lp, vocab)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 300_000), st.integers(0, 2**32 - 1))
def test_round_trip_k1(vocab, seed):
    rng = np.random.default_rng(seed)
    ids = torch.tensor([[0], [vocab - 1], [int(rng.integers(vocab))]])
    lp = torch.tensor([[-1e-6], [-3.0], [float(-rng.exponential(5.0))]])
    _check_round_trip(ids, lp, vocab)


def test_size_at_gemma_vocab():
    assert bytes_per_token(64, 262_144) == 200
    fmt = TopKFormat(64, 262_144)
    assert fmt.id_bits == 18 and fmt.bits == 1600
    assert bytes_per_token(64, 262_143) == 200  # still 18 bits; V not a power of two
    assert bytes_per_token(64, 65_536) == 184  # 16-bit ids
    assert TopKFormat(1, 2).bytes_per_token == 3


def test_ties_keep_input_order_and_unsorted_input_is_sorted():
    ids = torch.tensor([[5, 3, 9, 1]])
    lp = torch.tensor([[-2.0, -1.0, -2.0, -1.0]])
    got_ids, _ = decode_topk(encode_topk(ids, lp, 10), 4, 10)
    assert got_ids.tolist() == [[3, 1, 5, 9]]


def test_unused_slots_and_empty_rows():
    ids = torch.tensor([[4, -1, 7, -1], [-1, -1, -1, -1], [2, 3, 0, 1]])
    lp = torch.tensor([[-0.5, -1.0, -2.0, -3.0], [-1.0] * 4, [-1.0, -2.0, -math.inf, -3.0]])
    got_ids, got_lp = decode_topk(encode_topk(ids, lp, 8), 4, 8)
    assert got_ids.tolist() == [[4, 7, -1, -1], [-1] * 4, [2, 3, 1, -1]]
    assert torch.isinf(got_lp[got_ids < 0]).all() and torch.isfinite(got_lp[got_ids >= 0]).all()
    want = torch.tensor([[-0.5, -2.0, -math.inf, -math.inf]])
    assert ((got_lp[:1] - want).abs()[:, :2] <= error_bound(want, 4, 8)[:, :2]).all()


def test_peaked_distribution_keeps_its_tail():
    """p_1 = 1 − 1e-9: the tail bucket survives through the mass code (given the exact tail)."""
    lp = torch.tensor([[-1e-9, -25.0, -26.0, -27.0]], dtype=torch.float64)
    log_tail = torch.log(torch.tensor([1e-9 - lp[0, 1:].exp().sum().item()], dtype=torch.float64))
    packed = encode_topk(torch.tensor([[1, 2, 3, 4]]), lp, 10, log_tail=log_tail)
    _, got = decode_topk(packed, 4, 10)
    tail = -torch.expm1(got.double().logsumexp(-1))
    assert abs(tail.item() / math.exp(log_tail.item()) - 1) < 1e-3


def test_decoded_kl_is_small_on_heavy_head_distributions():
    """KL(p‖p̂) over top-64 + tail on softmax(σ·N(0,1) + head boosts), V = 262,144 (documented ≤ ~1e-6)."""
    g = torch.Generator().manual_seed(0)
    vocab, k = 262_144, 64
    z = (1 + 3 * torch.rand(32, 1, generator=g, dtype=torch.float64)) * torch.randn(32, vocab, generator=g, dtype=torch.float64)
    z[:16, 0] += 2 + 14 * torch.rand(16, generator=g, dtype=torch.float64)  # peaked half
    logp = z.log_softmax(-1)
    vals, ids = logp.topk(k, -1)
    log_tail = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
    got_ids, got = decode_topk(encode_topk(ids, vals.float(), vocab, log_tail=log_tail), k, vocab)
    assert torch.equal(got_ids, ids)
    got = got.double()
    got_tail = torch.log(-torch.expm1(got.logsumexp(-1)))
    kl = (vals.exp() * (vals - got)).sum(-1) + log_tail.exp() * (log_tail - got_tail)
    assert kl.max() < 1e-5 and kl.mean() < 2e-6
    assert (got[:, 0] - vals[:, 0]).abs().max() < 5e-3


def test_bad_inputs():
    with pytest.raises(ShapeError):
        encode_topk(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4), 10)
    with pytest.raises(ShapeError, match="ids must be in"):
        encode_topk(torch.tensor([[10]]), torch.tensor([[-1.0]]), 10)
    with pytest.raises(ConfigError, match="k"):
        TopKFormat(0, 10)
    with pytest.raises(DataError, match="expected"):
        decode_topk(torch.zeros(3, 5, dtype=torch.uint8), 4, 10)
    packed = encode_topk(torch.tensor([[1, 2, 3]]), torch.tensor([[-1.0, -2.0, -3.0]]), 10)
    packed[0, -1] ^= 0xFF  # scramble the gap stream
    with pytest.raises(DataError, match="corrupt"):
        decode_topk(packed, 3, 10)
