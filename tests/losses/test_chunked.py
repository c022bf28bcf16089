"""The chunked LM loss equals the dense loss on full logits, value and gradients."""

from __future__ import annotations

import pytest
import torch

from kdistill.errors import ShapeError
from kdistill.losses import HiddenTargets, LMHead, SparseTargets, chunked_distribution_loss, distribution_loss
from kdistill.losses.response import DIVERGENCES


def _setup(seed: int = 0, bias: bool = True, softcap: float | None = None, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    weight = (torch.randn(50, 16, generator=g) * 0.5).requires_grad_(True)
    b = (torch.randn(50, generator=g) * 0.1).requires_grad_(True) if bias else None
    head = LMHead(weight, b, scale=scale, softcap=softcap)
    teacher_hidden = torch.randn(3, 7, 24, generator=g)
    teacher_head = LMHead(torch.randn(50, 24, generator=g) * 0.5, softcap=softcap)
    mask = torch.rand(3, 7, generator=g) > 0.25
    return hidden, head, teacher_hidden, teacher_head, mask


def _grads(loss: torch.Tensor, head: LMHead, hidden: torch.Tensor) -> list[torch.Tensor]:
    params = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
    return list(torch.autograd.grad(loss, params))


def _dense(hidden, head, teacher_logits, mask, **kw):
    logits = head.logits(hidden.reshape(-1, hidden.shape[-1])).reshape(*hidden.shape[:-1], -1)
    return distribution_loss(logits, teacher_logits, mask, **kw)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_equals_dense_for_hidden_targets(kind: str, chunk_size: int) -> None:
    hidden, head, t_hidden, t_head, mask = _setup(softcap=4.0, scale=0.8)
    kw = {"kind": kind, "temperature": 2.0, "beta": 0.3}
    teacher_logits = t_head.logits(t_hidden.reshape(-1, 24)).reshape(3, 7, 50)
    dense = _dense(hidden, head, teacher_logits, mask, **kw)
    chunked = chunked_distribution_loss(hidden, head, HiddenTargets(t_hidden, t_head), mask, chunk_size=chunk_size, **kw)
    assert chunked.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-6)
    for a, b in zip(_grads(chunked, head, hidden), _grads(dense, head, hidden)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("missing_mass", ["tail", "renormalize"])
def test_chunked_equals_dense_for_sparse_and_logit_targets(missing_mass: str) -> None:
    hidden, head, t_hidden, t_head, mask = _setup(seed=1)
    teacher_logits = t_head.logits(t_hidden.reshape(-1, 24)).reshape(3, 7, 50)
    values, ids = teacher_logits.log_softmax(-1).topk(8, -1)
    for teacher in (teacher_logits, SparseTargets(ids, values)):
        dense = _dense(hidden, head, teacher, mask, missing_mass=missing_mass)
        chunked = chunked_distribution_loss(hidden, head, teacher, mask, missing_mass=missing_mass, chunk_size=5)
        assert chunked.item() == pytest.approx(dense.item(), rel=1e-5)
        for a, b in zip(_grads(chunked, head, hidden), _grads(dense, head, hidden)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_gradient_accumulation_invariance() -> None:
    hidden, head, t_hidden, t_head, mask = _setup(seed=2)
    whole = chunked_distribution_loss(hidden, head, HiddenTargets(t_hidden, t_head), mask, chunk_size=3)
    n = mask.sum()
    parts = sum(
        chunked_distribution_loss(hidden[i : i + 1], head, HiddenTargets(t_hidden[i : i + 1], t_head),
                                  mask[i : i + 1], num_valid=n, chunk_size=3)
        for i in range(3)
    )
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
    for a, b in zip(_grads(parts, head, hidden), _grads(whole, head, hidden)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_without_grad_and_with_fully_masked_input() -> None:
    hidden, head, t_hidden, t_head, mask = _setup(seed=3, bias=False)
    targets = HiddenTargets(t_hidden, t_head)
    with_grad = chunked_distribution_loss(hidden, head, targets, mask)
    with torch.no_grad():
        no_grad = chunked_distribution_loss(hidden, head, targets, mask)
    assert no_grad.item() == pytest.approx(with_grad.item(), rel=1e-6)
    empty = chunked_distribution_loss(hidden, head, targets, torch.zeros_like(mask))
    assert empty.item() == 0.0
    empty.backward()
    assert hidden.grad.abs().max() == 0 and head.weight.grad.abs().max() == 0


def test_chunked_bfloat16_hidden_states() -> None:
    hidden, head, t_hidden, t_head, mask = _setup(seed=4, bias=False)
    h16 = hidden.detach().bfloat16().requires_grad_(True)
    head16 = LMHead(head.weight.detach().bfloat16().requires_grad_(True))
    loss = chunked_distribution_loss(h16, head16, HiddenTargets(t_hidden, t_head), mask, chunk_size=4)
    loss.backward()
    assert loss.dtype == torch.float32 and h16.grad.dtype == torch.bfloat16
    ref = chunked_distribution_loss(h16.detach().float(), LMHead(head16.weight.detach().float()),
                                    HiddenTargets(t_hidden, t_head), mask)
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)


@pytest.mark.parametrize("vocab", [50, 5000])  # one GEMM; vocabulary-blocked GEMM
def test_chunked_under_bfloat16_autocast_with_fp32_heads(vocab: int) -> None:
    g = torch.Generator().manual_seed(5)
    layer = torch.nn.Linear(16, 16)
    x, tx = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    head = LMHead(torch.randn(vocab, 16, generator=g).requires_grad_(True))
    t_head = LMHead(torch.randn(vocab, 16, generator=g))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, t_hidden = layer(x), layer(tx)  # bf16 activations, fp32 weights
        loss = chunked_distribution_loss(hidden, head, HiddenTargets(t_hidden, t_head), chunk_size=5)
    loss.backward()
    assert loss.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    ref = chunked_distribution_loss(hidden.detach().float(), LMHead(head.weight.detach()),
                                    HiddenTargets(t_hidden.detach().float(), t_head))
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)


def test_chunked_shape_errors() -> None:
    hidden, head, t_hidden, t_head, mask = _setup(seed=5)
    with pytest.raises(ShapeError, match="hidden width"):
        chunked_distribution_loss(hidden[..., :8], head, HiddenTargets(t_hidden, t_head))
    with pytest.raises(ShapeError, match="teacher hidden"):
        chunked_distribution_loss(hidden, head, HiddenTargets(t_hidden[:2], t_head))
    with pytest.raises(ShapeError, match="chunk_size"):
        chunked_distribution_loss(hidden, head, HiddenTargets(t_hidden, t_head), chunk_size=0)
    wide = LMHead(torch.randn(60, 24))
    with pytest.raises(ShapeError, match="vocab_size"):
        chunked_distribution_loss(hidden, head, HiddenTargets(t_hidden, wide))
    loss = chunked_distribution_loss(hidden, head, HiddenTargets(t_hidden, wide), vocab_size=50)
    assert torch.isfinite(loss)


def test_chunked_ensemble_equals_dense_mixture() -> None:
    from kdistill.losses import EnsembleHiddenTargets
    from kdistill.losses.response import mixture_logits

    hidden, head, t_hidden, t_head, mask = _setup(seed=6)
    g = torch.Generator().manual_seed(60)
    other = HiddenTargets(torch.randn(3, 7, 24, generator=g), LMHead(torch.randn(50, 24, generator=g)))
    first = HiddenTargets(t_hidden, t_head)
    logits = [t.head.logits(t.hidden.reshape(-1, 24)).reshape(3, 7, 50) for t in (first, other)]
    dense = _dense(hidden, head, mixture_logits(logits, [0.3, 0.7], 2.0), mask, temperature=2.0)
    chunked = chunked_distribution_loss(hidden, head, EnsembleHiddenTargets((first, other), (0.3, 0.7)), mask,
                                        temperature=2.0, chunk_size=4)
    assert chunked.item() == pytest.approx(dense.item(), rel=1e-5)
    for a, b in zip(_grads(chunked, head, hidden), _grads(dense, head, hidden)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [2, 1000])
def test_fused_terms_equal_the_weighted_sum_of_separate_losses(chunk_size: int) -> None:
    """KD (dense hidden targets, T = 2) + sparse top-k KL + hard-label CE in one pass: the fused
    loss and its gradients equal Σ weight · loss of separate calls; each term's value is returned."""
    from kdistill.losses import ChunkedTerm, chunked_distribution_losses
    from kdistill.losses.response import DistributionSpec

    hidden, head, t_hidden, t_head, mask = _setup(seed=3, softcap=4.0)
    values, ids = t_head.logits(t_hidden.reshape(-1, 24)).reshape(3, 7, 50).log_softmax(-1).topk(6, -1)
    labels = torch.randint(0, 50, (3, 7, 1), generator=torch.Generator().manual_seed(4))
    one_hot = SparseTargets(labels, torch.zeros(labels.shape))
    specs = [
        (HiddenTargets(t_hidden, t_head), dict(kind="jsd", beta=0.3, temperature=2.0), 11.0, 0.7),
        (SparseTargets(ids, values), dict(kind="forward_kl", missing_mass="tail"), 13.0, 1.0),
        (one_hot, dict(kind="soft_ce", missing_mass="ignore"), 9.0, 0.25),
    ]
    separate = [chunked_distribution_loss(hidden, head, t, mask, num_valid=n, chunk_size=3, **kw)
                for t, kw, n, _ in specs]
    expected = sum(w * loss for loss, (_, _, _, w) in zip(separate, specs))
    terms = [ChunkedTerm(t, DistributionSpec(**kw), n, w) for t, kw, n, w in specs]
    fused, parts = chunked_distribution_losses(hidden, head, terms, mask, chunk_size=chunk_size)
    assert fused.item() == pytest.approx(expected.item(), rel=1e-5)
    assert [p.item() for p in parts] == pytest.approx([s.item() for s in separate], rel=1e-5)
    assert all(not p.requires_grad for p in parts)
    for a, b in zip(_grads(fused, head, hidden), _grads(expected, head, hidden)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the evaluation path gives the same numbers
        fused_eval, parts_eval = chunked_distribution_losses(hidden, head, terms, mask, chunk_size=chunk_size)
    assert fused_eval.item() == pytest.approx(fused.item(), rel=1e-5)
    assert [p.item() for p in parts_eval] == pytest.approx([p.item() for p in parts], rel=1e-5)


@pytest.mark.parametrize(("scale", "softcap"), [(1.0, None), (0.5, None), (1.0, 5.0), (3.0, 2.0)])
def test_in_place_transform_equals_transform(scale, softcap):
    head = LMHead(torch.randn(8, 4), scale=scale, softcap=softcap)
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)) * 20
    expected = head.transform(z)
    out = z.clone()
    assert head.transform_(out) is out and torch.equal(out, expected)


@pytest.mark.parametrize("vocab", [50, 5000])  # one GEMM; vocabulary-blocked GEMM
def test_under_autocast_only_the_gemms_are_bf16(vocab: int) -> None:
    """Under bf16 autocast the head GEMMs run in bf16 and every element-wise step in fp32: the
    value equals the fp32 loss of the bf16 GEMMs' logits (to fp32 rounding), the gradients that
    loss's gradients (to bf16 rounding of ∂z and the GEMMs)."""
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 6, 16, generator=g, requires_grad=True)
    head = LMHead(torch.randn(vocab, 16, generator=g).requires_grad_(True))
    t_hidden, t_head = torch.randn(2, 6, 16, generator=g), LMHead(torch.randn(vocab, 16, generator=g))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_distribution_loss(hidden, head, HiddenTargets(t_hidden, t_head), chunk_size=5)
    grads = _grads(loss, head, hidden)
    assert loss.dtype == torch.float32 and all(x.dtype == torch.float32 for x in grads)

    h16, w16 = hidden.detach().bfloat16().requires_grad_(True), head.weight.detach().bfloat16().requires_grad_(True)
    logits = (h16 @ w16.t()).float()  # the bf16 GEMM's output, then fp32
    teacher = (t_hidden.bfloat16() @ t_head.weight.bfloat16().t()).float()
    ref = distribution_loss(logits, teacher)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    ref_grads = torch.autograd.grad(ref, (h16, w16))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want.float(), rtol=2e-2, atol=2e-2 * want.float().abs().max().item())
