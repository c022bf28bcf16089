"""The KD-loss properties for every divergence on the paths the engine uses for LLMs: sparse
top-k targets (cache), the chunked loss (live teacher, cache, ensemble, hard-label CE) and the
closed form inside it. Non-negative; zero at equality; padding changes nothing; micro-batches with
the global count add up to the whole batch (value and gradients); values pinned against
hand-written formulas, not against the code under test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_response import _naive_value, _softmax

from kdistill.distill.distiller import causal_ce_term, hard_ce
from kdistill.losses import (
    EnsembleHiddenTargets,
    HiddenTargets,
    LMHead,
    SparseTargets,
    chunked_distribution_loss,
    chunked_distribution_losses,
    distribution_loss,
)
from kdistill.losses.closed_form import closed_form_chunk
from kdistill.losses.response import DIVERGENCES, DistributionSpec
from kdistill.losses.workspace import Workspace

POLICIES = ("tail", "renormalize")
V, H, K = 30, 12, 5


def _topk(logits: torch.Tensor, k: int = K, temperature: float = 1.0) -> SparseTargets:
    values, ids = (logits / temperature).log_softmax(-1).topk(k, -1)
    return SparseTargets(ids, values, temperature)


def _sparse_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(4, 6, V, generator=g) * 2).requires_grad_(True)
    teacher = torch.randn(4, 6, V, generator=g) * 2
    mask = torch.rand(4, 6, generator=g) > 0.3
    return student, teacher, mask


# ---------------------------------------------------------------- sparse top-k targets


@pytest.mark.parametrize("missing_mass", POLICIES)
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sparse_value_matches_the_bucketed_or_renormalised_formula(kind: str, missing_mass: str) -> None:
    """k < V: the top-k plus one tail bucket (tail), or the top-k renormalised (renormalize)."""
    g = torch.Generator().manual_seed(20)
    student, teacher = torch.randn(2, 3, V, generator=g) * 2, torch.randn(2, 3, V, generator=g) * 2
    temperature = 2.0
    targets = _topk(teacher, K, temperature)
    total = 0.0
    for b in range(2):
        for i in range(3):
            p = _softmax(teacher[b, i].tolist(), temperature)
            q = _softmax(student[b, i].tolist(), temperature)
            ids = targets.ids[b, i].tolist()
            p_k, q_k = [p[j] for j in ids], [q[j] for j in ids]
            if missing_mass == "tail":
                p_k, q_k = p_k + [1 - sum(p_k)], q_k + [1 - sum(q_k)]
            else:
                p_k, q_k = [x / sum(p_k) for x in p_k], [x / sum(q_k) for x in q_k]
            total += _naive_value(kind, p_k, q_k, beta=0.3, alpha=0.2)
    want = temperature**2 * total / 6
    got = distribution_loss(student, targets, kind=kind, temperature=temperature, beta=0.3, alpha=0.2,
                            missing_mass=missing_mass)
    assert want > 0 and got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("missing_mass", POLICIES)
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sparse_invariant_to_padding(kind: str, missing_mass: str) -> None:
    student, teacher, _ = _sparse_case(21)
    targets = _topk(teacher)
    base = distribution_loss(student, targets, kind=kind, missing_mass=missing_mass)
    (grad,) = torch.autograd.grad(base, student)

    garbage = torch.full((4, 3, V), 1e4)
    garbage[..., 0] = -1e4
    student_pad = torch.cat([student.detach(), garbage], 1).requires_grad_(True)
    pad_ids = torch.zeros(4, 3, K, dtype=torch.long)  # in range, as a cache's padded rows hold
    pad_logprobs = torch.full((4, 3, K), math.nan)
    targets_pad = SparseTargets(torch.cat([targets.ids, pad_ids], 1), torch.cat([targets.logprobs, pad_logprobs], 1))
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[:, :6] = True
    padded = distribution_loss(student_pad, targets_pad, mask, kind=kind, missing_mass=missing_mass)
    (grad_pad,) = torch.autograd.grad(padded, student_pad)
    assert padded.item() == pytest.approx(base.item(), rel=1e-6)
    torch.testing.assert_close(grad_pad[:, :6], grad)
    assert grad_pad[:, 6:].abs().max() == 0


@pytest.mark.parametrize(("kind", "missing_mass"),
                         [(k, p) for k in DIVERGENCES for p in POLICIES] + [("soft_ce", "ignore")])
def test_sparse_gradient_accumulation_invariance(kind: str, missing_mass: str) -> None:
    student, teacher, mask = _sparse_case(22)
    targets = _topk(teacher, K, 2.0)
    kw = {"kind": kind, "missing_mass": missing_mass, "temperature": 2.0}
    whole = distribution_loss(student, targets, mask, **kw)
    (grad_whole,) = torch.autograd.grad(whole, student)
    n = mask.sum()
    parts = sum(distribution_loss(student[i:i + 2], SparseTargets(targets.ids[i:i + 2], targets.logprobs[i:i + 2],
                                                                   targets.temperature),
                                  mask[i:i + 2], num_valid=n, **kw) for i in (0, 2))
    (grad_parts,) = torch.autograd.grad(parts, student)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(grad_parts, grad_whole)


@pytest.mark.parametrize("missing_mass", POLICIES)
def test_sparse_soft_ce_is_non_negative_and_the_teacher_entropy_at_equality(missing_mass: str) -> None:
    """soft CE = KL + H(p): at equality it is the (bucketed or renormalised) teacher entropy, not 0."""
    _, teacher, _ = _sparse_case(23)
    targets = _topk(teacher)
    at_equality = distribution_loss(teacher, targets, kind="soft_ce", missing_mass=missing_mass)
    p = targets.logprobs.exp()
    if missing_mass == "tail":
        tail = (1 - p.sum(-1, keepdim=True)).clamp_min(0)
        p = torch.cat([p, tail], -1)
    else:
        p = p / p.sum(-1, keepdim=True)
    entropy = -(p * p.log()).sum(-1).mean()
    assert at_equality.item() == pytest.approx(entropy.item(), rel=1e-5) and at_equality.item() > 0


# ---------------------------------------------------------------- chunked path


def _chunked_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, H, generator=g, requires_grad=True)
    head = LMHead((torch.randn(V, H, generator=g) * 0.5).requires_grad_(True),
                  (torch.randn(V, generator=g) * 0.1).requires_grad_(True), softcap=4.0)
    t_hidden = torch.randn(3, 7, H + 4, generator=g)
    t_head = LMHead(torch.randn(V, H + 4, generator=g) * 0.5, softcap=4.0)
    mask = torch.rand(3, 7, generator=g) > 0.25
    return hidden, head, t_hidden, t_head, mask


def _grads(loss, head, hidden):
    return torch.autograd.grad(loss, [hidden, head.weight, head.bias])


def _assert_same_value_and_grads(got, want, head, hidden, rel: float = 1e-5) -> None:
    """Same loss value and the same gradients for the hidden states, head weight and bias."""
    assert got.item() == pytest.approx(want.item(), rel=rel, abs=1e-7)
    for a, b in zip(_grads(got, head, hidden), _grads(want, head, hidden)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _dense_logits(hidden, head):
    return head.logits(hidden.reshape(-1, hidden.shape[-1])).reshape(*hidden.shape[:-1], -1)


def _targets(kind_of_target: str, t_hidden, t_head, seed: int = 0):
    """Teacher targets of each kind the engine hands the chunked loss, and a slicer over the batch."""
    if kind_of_target == "hidden":
        return HiddenTargets(t_hidden, t_head), lambda t, i, j: HiddenTargets(t.hidden[i:j], t.head)
    if kind_of_target == "sparse":
        sparse = _topk(_dense_logits(t_hidden, t_head), K, 2.0)
        return sparse, lambda t, i, j: SparseTargets(t.ids[i:j], t.logprobs[i:j], t.temperature)
    g = torch.Generator().manual_seed(seed)
    other = HiddenTargets(torch.randn(*t_hidden.shape, generator=g), LMHead(torch.randn(V, t_hidden.shape[-1],
                                                                                        generator=g)))
    ensemble = EnsembleHiddenTargets((HiddenTargets(t_hidden, t_head), other), (0.3, 0.7))
    return ensemble, lambda t, i, j: EnsembleHiddenTargets(
        tuple(HiddenTargets(m.hidden[i:j], m.head) for m in t.members), t.weights)


@pytest.mark.parametrize("missing_mass", POLICIES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_chunked_equals_dense_for_sparse_targets_of_every_kind(kind: str, temperature: float,
                                                               missing_mass: str) -> None:
    hidden, head, t_hidden, t_head, mask = _chunked_case(30)
    targets = _topk(_dense_logits(t_hidden, t_head), K, temperature)
    kw = {"kind": kind, "temperature": temperature, "missing_mass": missing_mass, "beta": 0.3}
    dense = distribution_loss(_dense_logits(hidden, head), targets, mask, **kw)
    chunked = chunked_distribution_loss(hidden, head, targets, mask, chunk_size=4, **kw)
    _assert_same_value_and_grads(chunked, dense, head, hidden)


@pytest.mark.parametrize("target", ["hidden", "sparse", "ensemble"])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_chunked_gradient_accumulation_invariance_for_every_kind_and_target(kind: str, target: str) -> None:
    hidden, head, t_hidden, t_head, mask = _chunked_case(31)
    targets, rows = _targets(target, t_hidden, t_head, seed=32)
    kw = {"kind": kind, "temperature": 2.0, "beta": 0.3, "chunk_size": 3}
    whole = chunked_distribution_loss(hidden, head, targets, mask, **kw)
    n = mask.sum()
    parts = sum(chunked_distribution_loss(hidden[i:i + 1], head, rows(targets, i, i + 1), mask[i:i + 1], num_valid=n,
                                          **kw) for i in range(3))
    _assert_same_value_and_grads(parts, whole, head, hidden)


@pytest.mark.parametrize("target", ["hidden", "sparse", "ensemble"])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_chunked_invariant_to_padding_for_every_kind_and_target(kind: str, target: str) -> None:
    hidden, head, t_hidden, t_head, mask = _chunked_case(33)
    mask = torch.ones_like(mask)
    targets, _ = _targets(target, t_hidden, t_head, seed=34)
    kw = {"kind": kind, "temperature": 2.0, "beta": 0.3, "chunk_size": 4}
    base = chunked_distribution_loss(hidden, head, targets, mask, **kw)
    grads = _grads(base, head, hidden)

    hidden_pad = torch.cat([hidden.detach(), torch.full((3, 4, H), 1e4)], 1).requires_grad_(True)
    t_pad = torch.full((3, 4, H + 4), math.nan)
    if target == "hidden":
        padded_targets = HiddenTargets(torch.cat([t_hidden, t_pad], 1), t_head)
    elif target == "sparse":
        padded_targets = SparseTargets(torch.cat([targets.ids, torch.zeros(3, 4, K, dtype=torch.long)], 1),
                                       torch.cat([targets.logprobs, torch.full((3, 4, K), math.nan)], 1),
                                       targets.temperature)
    else:
        padded_targets = EnsembleHiddenTargets(
            tuple(HiddenTargets(torch.cat([m.hidden, t_pad], 1), m.head) for m in targets.members), targets.weights)
    mask_pad = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    padded = chunked_distribution_loss(hidden_pad, head, padded_targets, mask_pad, **kw)
    grads_pad = _grads(padded, head, hidden_pad)
    assert padded.item() == pytest.approx(base.item(), rel=1e-6)
    torch.testing.assert_close(grads_pad[0][:, :7], grads[0])
    assert grads_pad[0][:, 7:].abs().max() == 0
    for a, b in zip(grads_pad[1:], grads[1:]):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- hard-label CE (recipe kind `ce`)


def test_causal_ce_term_is_cross_entropy_and_ignores_padding_and_splits() -> None:
    hidden, head, _, _, _ = _chunked_case(40)
    g = torch.Generator().manual_seed(41)
    labels = torch.randint(0, V, (3, 8), generator=g)  # row j of hidden predicts label j + 1
    labels[0, 5:] = -100  # padding
    labels[2, 3] = -100
    mask = labels[:, 1:] != -100
    count = int(mask.sum())
    logits = _dense_logits(hidden, head)
    want = F.cross_entropy(logits[mask], labels[:, 1:][mask], reduction="sum") / count
    got, _ = chunked_distribution_losses(hidden, head, [causal_ce_term(labels, count, None)], mask, chunk_size=4)
    assert want.item() > 0 and got.item() == pytest.approx(want.item(), rel=1e-6)
    want_grads = _grads(want, head, hidden)
    for a, b in zip(_grads(got, head, hidden), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # micro-batches with the global count add up to the whole batch
    parts = sum(chunked_distribution_losses(hidden[i:i + 1], head, [causal_ce_term(labels[i:i + 1], count, None)],
                                            mask[i:i + 1], chunk_size=4)[0] for i in range(3))
    assert parts.item() == pytest.approx(got.item(), rel=1e-6)
    for a, b in zip(_grads(parts, head, hidden), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_classification_hard_ce_ignores_padding_and_splits() -> None:
    g = torch.Generator().manual_seed(42)
    logits = torch.randn(6, 3, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (6,), generator=g)
    mask = torch.tensor([True, True, False, True, True, True])
    want = F.cross_entropy(logits[mask], labels[mask], reduction="sum") / 5
    got = hard_ce("classification", None, {"logits": logits}, {"labels": labels}, mask, 5)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    garbage = logits.detach().clone()
    garbage[2] = 1e4
    garbage.requires_grad_(True)
    padded = hard_ce("classification", None, {"logits": garbage}, {"labels": labels}, mask, 5)
    (grad,) = torch.autograd.grad(padded, garbage)
    assert padded.item() == pytest.approx(want.item(), rel=1e-6) and grad[2].abs().max() == 0
    parts = sum(hard_ce("classification", None, {"logits": logits[i:i + 3]}, {"labels": labels[i:i + 3]},
                        mask[i:i + 3], 5) for i in (0, 3))
    assert parts.item() == pytest.approx(want.item(), rel=1e-6)


# ---------------------------------------------------------------- closed form, by hand


class _Rows:
    def __init__(self, target, spec: DistributionSpec, vocab: int, coef: float = 1.0) -> None:
        self.target, self.spec, self.vocab, self.coef = target, spec, vocab, coef

    def rows(self, a: int, b: int, workspace=None, name: str = "teacher"):
        if isinstance(self.target, SparseTargets):
            return SparseTargets(self.target.ids[a:b], self.target.logprobs[a:b], self.target.temperature)
        return self.target[a:b]


def test_closed_form_forward_kl_by_hand() -> None:
    """p = (½, ½), q = (¼, ¾): KL(p‖q) = ½ ln 2 + ½ ln ⅔ and ∂/∂z = q − p = (−¼, ¼) at T = 1."""
    z = torch.tensor([[math.log(0.25), math.log(0.75)]])
    teacher = torch.tensor([[0.0, 0.0]])
    part = _Rows(teacher, DistributionSpec("forward_kl"), 2)
    sums, grad = closed_form_chunk(z.clone(), LMHead(torch.zeros(2, 1)), [part], 0, 1, Workspace())
    assert sums.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, 0.25]]))


def test_closed_form_sparse_terms_are_zero_at_equality() -> None:
    g = torch.Generator().manual_seed(43)
    z = torch.randn(4, V, generator=g) * 2
    targets = _topk(z, K)
    parts = [_Rows(targets, DistributionSpec(kind, missing_mass=policy), V)
             for kind in ("forward_kl", "reverse_kl", "jsd") for policy in POLICIES]
    sums, grad = closed_form_chunk(z.clone(), LMHead(torch.zeros(V, 1)), parts, 0, 4, Workspace())
    assert sums.abs().max() < 1e-5 and grad.abs().max() < 1e-5
