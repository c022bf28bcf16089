"""Response-based losses: pinned values, a naive reference, and the properties every KD loss needs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdistill.errors import ConfigError, ShapeError
from kdistill.losses import SparseTargets, distribution_loss, get_loss, mask_from_labels
from kdistill.losses.response import DIVERGENCES, TAIL_FLOOR

TRUE_DIVERGENCES = [k for k in DIVERGENCES if k != "soft_ce"]


def _logits(*probs: float) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


# ---------------------------------------------------------------- naive reference (loops, math)


def _naive_value(kind: str, p: list[float], q: list[float], beta: float = 0.5, alpha: float = 0.1) -> float:
    def kl(a: list[float], b: list[float]) -> float:
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return (beta * kl(p, m) + (1 - beta) * kl(q, m)) / (beta * (1 - beta))
    if kind == "skew_forward_kl":
        return kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q)])
    if kind == "skew_reverse_kl":
        return kl(q, [alpha * y + (1 - alpha) * x for x, y in zip(p, q)])
    if kind == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    if kind == "soft_ce":
        return -sum(x * math.log(y) for x, y in zip(p, q))
    raise AssertionError(kind)


def _softmax(row: list[float], temperature: float) -> list[float]:
    z = [x / temperature for x in row]
    top = max(z)
    e = [math.exp(x - top) for x in z]
    return [x / sum(e) for x in e]


def _naive_loss(kind, student, teacher, mask, temperature=1.0, **kw) -> float:
    """Loop over positions: T² · Σ_valid value / n_valid."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for i in range(student.shape[1]):
            if mask is not None and not mask[b, i]:
                continue
            p = _softmax(teacher[b, i].tolist(), temperature)
            q = _softmax(student[b, i].tolist(), temperature)
            total += _naive_value(kind, p, q, **kw)
            count += 1
    return temperature**2 * total / max(count, 1)


# ---------------------------------------------------------------- pinned values


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("forward_kl", 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)),
        ("reverse_kl", 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)),
        ("tvd", 0.25),
        ("soft_ce", -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))),
        # m = (0.375, 0.625); [½ KL(p‖m) + ½ KL(q‖m)] / ¼
        (
            "jsd",
            (
                0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625))
                + 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625))
            )
            / 0.25,
        ),
        # α = 0.1: m = 0.1 p + 0.9 q = (0.275, 0.725)
        ("skew_forward_kl", 0.5 * math.log(0.5 / 0.275) + 0.5 * math.log(0.5 / 0.725)),
        # m = 0.1 q + 0.9 p = (0.475, 0.525)
        ("skew_reverse_kl", 0.25 * math.log(0.25 / 0.475) + 0.75 * math.log(0.75 / 0.525)),
    ],
)
def test_pinned_values_two_categories(kind: str, expected: float) -> None:
    teacher = _logits(0.5, 0.5)[None]
    student = _logits(0.25, 0.75)[None]
    got = distribution_loss(student, teacher, kind=kind)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_pinned_temperature_and_t2() -> None:
    # logits (0, ln 3) at T = 2 give softmax (1/(1+√3), √3/(1+√3)); teacher uniform.
    student = torch.tensor([[0.0, math.log(3.0)]])
    teacher = torch.zeros(1, 2)
    q1 = 1 / (1 + math.sqrt(3))
    kl = 0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1))
    with_t2 = distribution_loss(student, teacher, temperature=2.0)
    without = distribution_loss(student, teacher, temperature=2.0, scale_by_t2=False)
    assert with_t2.item() == pytest.approx(4 * kl, rel=1e-5)
    assert without.item() == pytest.approx(kl, rel=1e-5)


def test_pinned_mask_and_num_valid() -> None:
    student = torch.stack([_logits(0.25, 0.75), _logits(0.9, 0.1), _logits(0.5, 0.5)])[None]
    teacher = torch.stack([_logits(0.5, 0.5), _logits(0.5, 0.5), _logits(0.5, 0.5)])[None]
    labels = torch.tensor([[3, -100, 7]])
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    got = distribution_loss(student, teacher, mask_from_labels(labels))
    assert got.item() == pytest.approx(kl0 / 2, rel=1e-5)  # 2 valid positions, one with KL 0
    got = distribution_loss(student, teacher, mask_from_labels(labels), num_valid=10)
    assert got.item() == pytest.approx(kl0 / 10, rel=1e-5)


# ---------------------------------------------------------------- naive reference agreement


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_naive_reference(kind: str, temperature: float) -> None:
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 4, 7, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, 4, 7, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
    kw = {"beta": 0.3, "alpha": 0.2}
    got = distribution_loss(student.float(), teacher.float(), mask, kind=kind, temperature=temperature, **kw)
    want = _naive_loss(kind, student, teacher, mask, temperature, **{"beta": 0.3, "alpha": 0.2}
                       if kind in ("jsd",) else ({"alpha": 0.2} if kind.startswith("skew") else {}))
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("kind", DIVERGENCES)  # every kind, each with its own draws
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 50),
    scale=st.floats(0.01, 20.0),
    temperature=st.floats(0.5, 8.0),
    beta=st.floats(0.0, 1.0),
    alpha=st.floats(0.0, 0.99),
)
def test_non_negative_and_zero_at_equality(kind, seed, vocab, scale, temperature, beta, alpha) -> None:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 5, vocab, generator=g) * scale
    teacher = torch.randn(3, 5, vocab, generator=g) * scale
    kw = {"kind": kind, "temperature": temperature, "beta": beta, "alpha": alpha}
    value = distribution_loss(student, teacher, **kw)
    assert torch.isfinite(value) and value.item() >= 0.0
    if kind != "soft_ce":
        assert distribution_loss(teacher, teacher, **kw).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_invariant_to_padding(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 9, generator=g, requires_grad=True)
    teacher = torch.randn(2, 3, 9, generator=g)
    base = distribution_loss(student, teacher, kind=kind)
    (grad,) = torch.autograd.grad(base, student)

    garbage = torch.full((2, 4, 9), 1e4)
    garbage[..., 0] = -1e4
    student_pad = torch.cat([student.detach(), garbage], 1).requires_grad_(True)
    teacher_pad = torch.cat([teacher, -garbage], 1)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, :3] = True
    padded = distribution_loss(student_pad, teacher_pad, mask, kind=kind)
    (grad_pad,) = torch.autograd.grad(padded, student_pad)
    assert padded.item() == pytest.approx(base.item(), rel=1e-6)
    torch.testing.assert_close(grad_pad[:, :3], grad)
    assert grad_pad[:, 3:].abs().max() == 0


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradient_accumulation_invariance(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    student = torch.randn(4, 6, 10, generator=g, requires_grad=True)
    teacher = torch.randn(4, 6, 10, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    whole = distribution_loss(student, teacher, mask, kind=kind)
    (grad_whole,) = torch.autograd.grad(whole, student)
    n = mask.sum()
    parts = sum(
        distribution_loss(student[i : i + 2], teacher[i : i + 2], mask[i : i + 2], kind=kind, num_valid=n)
        for i in (0, 2)
    )
    (grad_parts,) = torch.autograd.grad(parts, student)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(grad_parts, grad_whole)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_fully_masked_is_zero_with_connected_graph(kind: str) -> None:
    student = torch.randn(2, 3, 5, requires_grad=True)
    loss = distribution_loss(student, torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.bool), kind=kind)
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad is not None and student.grad.abs().max() == 0


def test_half_precision_inputs_compute_in_fp32() -> None:
    g = torch.Generator().manual_seed(2)
    student = (torch.randn(3, 4, 64, generator=g) * 5).bfloat16()
    teacher = (torch.randn(3, 4, 64, generator=g) * 5).bfloat16()
    got = distribution_loss(student, teacher)
    assert got.dtype == torch.float32
    want = distribution_loss(student.float(), teacher.float())
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_jsd_endpoints_are_the_kls_and_continuous() -> None:
    g = torch.Generator().manual_seed(4)
    student = torch.randn(8, 30, generator=g) * 3
    teacher = torch.randn(8, 30, generator=g) * 3
    fkl = distribution_loss(student, teacher, kind="forward_kl").item()
    rkl = distribution_loss(student, teacher, kind="reverse_kl").item()
    assert distribution_loss(student, teacher, kind="jsd", beta=0.0).item() == fkl
    assert distribution_loss(student, teacher, kind="jsd", beta=1.0).item() == rkl
    p64, q64 = teacher.double().softmax(-1), student.double().softmax(-1)

    def reference(beta: float) -> float:
        m = beta * p64 + (1 - beta) * q64
        kl_pm, kl_qm = (p64 * (p64 / m).log()).sum(-1), (q64 * (q64 / m).log()).sum(-1)
        return ((beta * kl_pm + (1 - beta) * kl_qm) / (beta * (1 - beta))).mean().item()

    for beta in (1e-7, 1e-5, 1e-3, 0.1, 0.9, 1 - 1e-3, 1 - 1e-5, 1 - 1e-7):  # accurate near the ends
        got = distribution_loss(student, teacher, kind="jsd", beta=beta).item()
        assert got == pytest.approx(reference(beta), rel=2e-4), beta
    # continuous at the ends: no collapse to 0, no jump
    assert distribution_loss(student, teacher, kind="jsd", beta=1e-7).item() == pytest.approx(fkl, rel=1e-3)
    assert distribution_loss(student, teacher, kind="jsd", beta=1 - 1e-7).item() == pytest.approx(rkl, rel=1e-3)
    # β = ½ is symmetric and equals 4 · the classic Jensen–Shannon divergence.
    half = distribution_loss(student, teacher, kind="jsd", beta=0.5).item()
    assert half == pytest.approx(distribution_loss(teacher, student, kind="jsd", beta=0.5).item(), rel=1e-5)
    assert half <= 4 * math.log(2)


def test_t2_keeps_gradient_norm_constant_at_high_temperature() -> None:
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(16, 50, generator=g)

    def grad_norm(temperature: float, t2: bool) -> float:
        student = torch.randn(16, 50, generator=torch.Generator().manual_seed(6), requires_grad=True)
        loss = distribution_loss(student, teacher, temperature=temperature, scale_by_t2=t2)
        (grad,) = torch.autograd.grad(loss, student)
        return grad.norm().item()

    with_t2 = [grad_norm(t, True) for t in (5.0, 10.0, 20.0)]
    without = [grad_norm(t, False) for t in (5.0, 10.0, 20.0)]
    assert max(with_t2) / min(with_t2) < 1.15
    assert without[0] / without[2] > 12  # shrinks ~1/T² without the factor (×16 over ×4 in T)


def test_soft_ce_is_kl_plus_teacher_entropy() -> None:
    g = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    p = teacher.softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean()
    ce = distribution_loss(student, teacher, kind="soft_ce")
    kl = distribution_loss(student, teacher, kind="forward_kl")
    assert ce.item() == pytest.approx((kl + entropy).item(), rel=1e-5)


# ---------------------------------------------------------------- sparse targets


def _topk(teacher: torch.Tensor, k: int, temperature: float = 1.0) -> SparseTargets:
    lp = torch.log_softmax(teacher / temperature, -1)
    values, ids = lp.topk(k, -1)
    return SparseTargets(ids, values, temperature)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("missing_mass", ["tail", "renormalize"])
def test_sparse_with_k_equal_v_is_dense(kind: str, missing_mass: str) -> None:
    g = torch.Generator().manual_seed(8)
    student = torch.randn(2, 3, 20, generator=g, requires_grad=True)
    teacher = torch.randn(2, 3, 20, generator=g) * 2
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    dense = distribution_loss(student, teacher, mask, kind=kind, temperature=2.0)
    sparse = distribution_loss(student, _topk(teacher, 20, 2.0), mask, kind=kind, temperature=2.0,
                               missing_mass=missing_mass)
    (g_dense,) = torch.autograd.grad(dense, student)
    (g_sparse,) = torch.autograd.grad(sparse, student)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-6)


def test_sparse_tail_matches_naive_bucketed_kl() -> None:
    g = torch.Generator().manual_seed(9)
    student = torch.randn(1, 1, 10, generator=g)
    teacher = torch.randn(1, 1, 10, generator=g)
    targets = _topk(teacher, 3)
    p, q = teacher.softmax(-1)[0, 0], student.softmax(-1)[0, 0]
    ids = targets.ids[0, 0]
    p_b = p[ids].tolist() + [1 - p[ids].sum().item()]
    q_b = q[ids].tolist() + [1 - q[ids].sum().item()]
    want = _naive_value("forward_kl", p_b, q_b)
    got = distribution_loss(student, targets, missing_mass="tail")
    assert got.item() == pytest.approx(want, rel=1e-5)
    p_r = [x / sum(p[ids].tolist()) for x in p[ids].tolist()]
    q_r = [x / sum(q[ids].tolist()) for x in q[ids].tolist()]
    got = distribution_loss(student, targets, missing_mass="renormalize")
    assert got.item() == pytest.approx(_naive_value("forward_kl", p_r, q_r), rel=1e-5)


@pytest.mark.parametrize("missing_mass", ["tail", "renormalize"])
@pytest.mark.parametrize("kind", TRUE_DIVERGENCES)
def test_sparse_zero_at_equality_and_nonnegative(missing_mass: str, kind: str) -> None:
    g = torch.Generator().manual_seed(10)
    teacher = torch.randn(3, 4, 40, generator=g) * 3
    targets = _topk(teacher, 8)
    assert distribution_loss(teacher, targets, kind=kind, missing_mass=missing_mass).item() == pytest.approx(
        0.0, abs=1e-6
    )
    student = torch.randn(3, 4, 40, generator=g)
    assert distribution_loss(student, targets, kind=kind, missing_mass=missing_mass).item() > 0


def test_sparse_tail_penalises_mass_moved_off_support() -> None:
    teacher = torch.tensor([[4.0, 3.0, 0.0, 0.0, 0.0]])
    targets = _topk(teacher, 2)
    same_ratio_more_tail = torch.tensor([[4.0, 3.0, 3.5, 3.5, 3.5]])  # same p1/p2 ratio on support
    assert distribution_loss(same_ratio_more_tail, targets, missing_mass="renormalize").item() == pytest.approx(
        0.0, abs=1e-6
    )
    assert distribution_loss(same_ratio_more_tail, targets, missing_mass="tail").item() > 0.1


def test_sparse_unused_slots_equal_dropping_them() -> None:
    g = torch.Generator().manual_seed(11)
    student, teacher = torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)
    t4 = _topk(teacher, 4)
    padded = SparseTargets(
        torch.cat([t4.ids, torch.full((2, 2), -1)], -1), torch.cat([t4.logprobs, torch.zeros(2, 2)], -1)
    )
    for policy in ("tail", "renormalize"):
        for kind in DIVERGENCES:
            a = distribution_loss(student, t4, kind=kind, missing_mass=policy)
            b = distribution_loss(student, padded, kind=kind, missing_mass=policy)
            assert b.item() == pytest.approx(a.item(), rel=1e-6), (policy, kind)


def test_sparse_tail_floor_is_symmetric() -> None:
    # A teacher with all mass on its top-k: the tail is floored on both sides, not an infinite penalty.
    teacher = torch.tensor([[30.0, 29.0, -30.0, -30.0]])
    targets = _topk(teacher, 2)
    loss = distribution_loss(teacher, targets, kind="reverse_kl")
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert TAIL_FLOOR > 0


# ---------------------------------------------------------------- vocabularies and bad input


def test_padded_vocabularies_compare_over_shared_real_vocab() -> None:
    g = torch.Generator().manual_seed(12)
    student = torch.randn(2, 3, 12, generator=g)  # padded to 12
    teacher = torch.randn(2, 3, 16, generator=g)  # padded to 16
    got = distribution_loss(student, teacher, vocab_size=10)
    want = distribution_loss(student[..., :10], teacher[..., :10])
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ShapeError, match="vocab_size"):
        distribution_loss(student, teacher)
    with pytest.raises(ShapeError, match="do not match"):
        distribution_loss(student, teacher, vocab_size=14)


def test_bad_input_errors() -> None:
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with pytest.raises(ConfigError, match="unknown divergence"):
        distribution_loss(s, t, kind="kl")
    with pytest.raises(ConfigError, match="beta"):
        distribution_loss(s, t, kind="jsd", beta=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        distribution_loss(s, t, temperature=0.0)
    with pytest.raises(ShapeError, match="mask"):
        distribution_loss(s, t, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ShapeError, match="teacher logits"):
        distribution_loss(s, torch.randn(2, 4, 5))
    targets = _topk(t, 2)
    with pytest.raises(ConfigError, match="temperature 1.0"):
        distribution_loss(s, targets, temperature=2.0)
    with pytest.raises(ShapeError, match="outside the compared vocabulary"):
        distribution_loss(s[..., :3], SparseTargets(targets.ids.clamp_min(4), targets.logprobs))


def test_registry_serves_each_divergence() -> None:
    g = torch.Generator().manual_seed(13)
    s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    for kind in DIVERGENCES:
        entry = get_loss(kind)
        assert entry.family == "response"
        assert entry.fn(s, t, temperature=2.0).item() == distribution_loss(s, t, kind=kind, temperature=2.0).item()
    with pytest.raises(ConfigError, match="unknown loss kind"):
        get_loss("kl_div")


def test_mixture_logits_give_the_weighted_mixture_at_the_temperature() -> None:
    from kdistill.losses.response import mixture_logits

    g = torch.Generator().manual_seed(14)
    a, b = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    for temperature in (1.0, 3.0):
        mixed = mixture_logits([a, b], [0.25, 0.75], temperature)
        want = 0.25 * (a / temperature).softmax(-1) + 0.75 * (b / temperature).softmax(-1)
        torch.testing.assert_close((mixed / temperature).softmax(-1), want)
    assert mixture_logits([a], [1.0], 2.0) is a


def test_ignore_policy_with_one_hot_targets_is_cross_entropy() -> None:
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(2, 5, 30, generator=g)
    labels = torch.randint(0, 30, (2, 5), generator=g)
    targets = SparseTargets(labels[..., None], torch.zeros(2, 5, 1))
    got = distribution_loss(logits, targets, kind="soft_ce", missing_mass="ignore")
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 30), labels.reshape(-1))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ConfigError, match="only defined for soft_ce"):
        distribution_loss(logits, targets, kind="forward_kl", missing_mass="ignore")
