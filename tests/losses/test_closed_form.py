"""Closed-form chunk gradients equal autograd through the same divergences."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from kdistill.losses import HiddenTargets, LMHead, SparseTargets, chunked_distribution_loss, distribution_loss
from kdistill.losses.chunked import ChunkedTerm, chunked_distribution_losses
from kdistill.losses.closed_form import closed_form_chunk, has_closed_form
from kdistill.losses.response import DistributionSpec, block_loss_sum
from kdistill.losses.workspace import Workspace


@dataclass(frozen=True)
class _Part:
    target: torch.Tensor | SparseTargets
    spec: DistributionSpec
    vocab: int
    coef: float

    def rows(self, a: int, b: int, workspace: Workspace | None = None, name: str = "teacher"):
        if isinstance(self.target, SparseTargets):
            return SparseTargets(self.target.ids[a:b], self.target.logprobs[a:b], self.target.temperature)
        return self.target[a:b]


def _autograd(z: torch.Tensor, head: LMHead, parts: list[_Part]) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().requires_grad_(True)
    logits = head.transform(z)
    terms = [block_loss_sum(logits, p.rows(0, z.shape[0]), p.spec, p.vocab) for p in parts]
    (grad,) = torch.autograd.grad(sum(p.coef * t for p, t in zip(parts, terms)), z)
    return torch.stack([t.detach() for t in terms]), grad


def _case(seed: int, width: int, vocab: int, scale: float, softcap: float | None, temperatures: tuple[float, ...]):
    g = torch.Generator().manual_seed(seed)
    rows = 6
    z = torch.randn(rows, width, generator=g) * 3
    head = LMHead(torch.zeros(width, 4), scale=scale, softcap=softcap)
    parts = []
    for i, t in enumerate(temperatures):
        teacher = torch.randn(rows, width, generator=g) * 3
        kind = "forward_kl" if i % 2 == 0 else "soft_ce"
        parts.append(_Part(teacher, DistributionSpec(kind, temperature=t, vocab_size=vocab), vocab, 0.7 + i))
    labels = torch.randint(0, vocab, (rows, 1), generator=g)
    labels[0, 0] = -1  # an unused slot contributes nothing
    ce = SparseTargets(labels, torch.zeros(rows, 1))
    parts.append(_Part(ce, DistributionSpec("soft_ce", missing_mass="ignore", vocab_size=vocab), vocab, 0.5))
    topk_values, topk_ids = (torch.randn(rows, vocab, generator=g) * 2).log_softmax(-1).topk(3, -1)
    soft = SparseTargets(topk_ids, topk_values, temperature=temperatures[0])
    parts.append(_Part(soft, DistributionSpec("soft_ce", temperature=temperatures[0], missing_mass="ignore",
                                              vocab_size=vocab), vocab, 1.3))
    for kind, missing_mass in (("forward_kl", "tail"), ("jsd", "renormalize"), ("reverse_kl", "tail")):
        spec = DistributionSpec(kind, temperature=temperatures[0], missing_mass=missing_mass, vocab_size=vocab)
        parts.append(_Part(soft, spec, vocab, 0.9))
    return z, head, parts


@pytest.mark.parametrize(
    ("width", "vocab", "scale", "softcap", "temperatures"),
    [
        (40, 40, 1.0, None, (1.0,)),
        (40, 40, 0.8, 5.0, (2.0,)),
        (40, 33, 1.0, None, (1.0, 1.0)),  # padded head: only the first 33 logits compared
        (40, 40, 1.3, None, (1.0, 3.0, 0.5)),  # several temperatures in one chunk
    ],
)
def test_closed_form_equals_autograd(width, vocab, scale, softcap, temperatures) -> None:
    z, head, parts = _case(0, width, vocab, scale, softcap, temperatures)
    result = closed_form_chunk(z.clone(), head, parts, 0, z.shape[0], Workspace())  # z may be overwritten
    assert result is not None
    sums, grad = result
    ref_sums, ref_grad = _autograd(z, head, parts)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    if vocab < width:
        assert grad[:, vocab:].abs().max() == 0


def test_closed_form_is_zero_when_student_equals_teacher() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 30, generator=g)
    parts = [_Part(z.clone(), DistributionSpec("forward_kl", temperature=t), 30, 1.0) for t in (1.0, 2.0)]
    sums, grad = closed_form_chunk(z.clone(), LMHead(torch.zeros(30, 2)), parts, 0, 5, Workspace())
    assert sums.abs().max() < 1e-5
    assert grad.abs().max() < 1e-6


def test_closed_form_declines_infinite_logits() -> None:
    z = torch.randn(3, 10)
    z[1, 4] = -math.inf  # the student gives a token no mass the teacher gives some
    parts = [_Part(torch.randn(3, 10), DistributionSpec("forward_kl"), 10, 1.0)]
    assert closed_form_chunk(z, LMHead(torch.zeros(10, 2)), parts, 0, 3, Workspace()) is None


def test_chunked_loss_with_infinite_teacher_logits_falls_back_to_the_masked_path() -> None:
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    head = LMHead(torch.randn(12, 8, generator=g).requires_grad_(True))
    teacher = torch.randn(2, 5, 12, generator=g)
    teacher[..., 3] = -math.inf  # a token the teacher never predicts: 0 · log 0 = 0
    loss = chunked_distribution_loss(hidden, head, teacher, chunk_size=3)
    logits = head.logits(hidden.reshape(-1, 8))
    p = teacher.reshape(-1, 12).log_softmax(-1)
    kept = torch.arange(12) != 3
    ref = (p.exp()[:, kept] * (p[:, kept] - logits.log_softmax(-1)[:, kept])).sum() / 10
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.weight.grad).all()


def test_which_terms_have_a_closed_form() -> None:
    dense, sparse = torch.zeros(1, 4), SparseTargets(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1))
    hidden = HiddenTargets(torch.zeros(1, 2), LMHead(torch.zeros(4, 2)))
    assert has_closed_form(dense, DistributionSpec("forward_kl"))
    assert has_closed_form(hidden, DistributionSpec("forward_kl", temperature=2.0))
    assert has_closed_form(dense, DistributionSpec("soft_ce"))
    for kind in ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl", "soft_ce"):
        assert has_closed_form(sparse, DistributionSpec(kind))  # autograd on the (N, k) support only
    for kind in ("reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"):
        assert not has_closed_form(dense, DistributionSpec(kind))


def test_second_backward_through_the_chunked_loss_is_refused() -> None:
    hidden = torch.randn(4, 8, requires_grad=True)
    head = LMHead(torch.randn(12, 8, requires_grad=True))
    loss = chunked_distribution_loss(hidden, head, torch.randn(4, 12), chunk_size=3)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_in_place_buffers_keep_each_terms_targets(temperature: float) -> None:
    """T = 1, no soft-cap: log-softmaxes run in place in the chunk's buffers; two dense terms on
    the same teacher and a hard-label CE must still each see their own targets."""
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    head = LMHead(torch.randn(5000, 8, generator=g).requires_grad_(True))
    teacher = HiddenTargets(torch.randn(2, 9, 8, generator=g), LMHead(torch.randn(5000, 8, generator=g)))
    labels = torch.randint(0, 5000, (2, 9, 1), generator=g)
    ce = SparseTargets(labels, torch.zeros(2, 9, 1))
    specs = [DistributionSpec("forward_kl", temperature=temperature), DistributionSpec("soft_ce", temperature=temperature)]
    terms = [ChunkedTerm(teacher, specs[0]), ChunkedTerm(teacher, specs[1], weight=0.5),
             ChunkedTerm(ce, DistributionSpec("soft_ce", missing_mass="ignore"), weight=2.0)]
    total, values = chunked_distribution_losses(hidden, head, terms, chunk_size=4)
    (got,) = torch.autograd.grad(total, hidden)
    logits = head.logits(hidden.reshape(-1, 8)).reshape(2, 9, -1)
    t_logits = teacher.head.logits(teacher.hidden.reshape(-1, 8)).reshape(2, 9, -1)
    ref = [distribution_loss(logits, t_logits, kind=s.kind, temperature=temperature) for s in specs]
    ref.append(distribution_loss(logits, ce, kind="soft_ce", missing_mass="ignore"))
    for v, r in zip(values, ref):
        assert v.item() == pytest.approx(r.item(), rel=1e-5)
    (want,) = torch.autograd.grad(ref[0] + 0.5 * ref[1] + 2.0 * ref[2], hidden)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
