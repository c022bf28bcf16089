"""Relation-based KD losses: RKD distance/angle, similarity-preserving, MiniLM relations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kdistill.errors import ConfigError, ShapeError
from kdistill.losses.relation import (
    attention_relation_kl,
    masked_mean_pool,
    pooled_relation_loss,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)

SAMPLE_LOSSES = [rkd_distance, rkd_angle, similarity_preserving]
SAMPLE_IDS = ["distance", "angle", "sp"]
KINDS = ["rkd_distance", "rkd_angle", "similarity_preserving"]


def pooled(seed: int, b: int = 5, hs: int = 4, ht: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hs, generator=g), torch.randn(b, ht, generator=g)


def tokens(seed: int, b: int = 4, length: int = 5, ds: int = 8, dt: int = 12):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, length, ds, generator=g)
    t = torch.randn(b, length, dt, generator=g)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return s, t, mask


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# --------------------------------------------------------------------------------------------
# Naive references (loops, float64).
# --------------------------------------------------------------------------------------------


def dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def naive_rkd_distance(s: torch.Tensor, t: torch.Tensor) -> float:
    pairs = list(itertools.combinations(range(len(s)), 2))
    ds = [dist(s[i], s[j]) for i, j in pairs]
    dt = [dist(t[i], t[j]) for i, j in pairs]
    ms, mt = sum(ds) / len(ds), sum(dt) / len(dt)
    return sum(smooth_l1(a / ms - b / mt) for a, b in zip(ds, dt)) / len(pairs)


def angle(x: torch.Tensor, i: int, j: int, k: int) -> float:
    u, v = (x[i] - x[j]).double(), (x[k] - x[j]).double()
    return float(u @ v) / (dist(x[i], x[j]) * dist(x[k], x[j]))


def naive_rkd_angle(s: torch.Tensor, t: torch.Tensor) -> float:
    values = []
    for j in range(len(s)):
        for i, k in itertools.combinations([n for n in range(len(s)) if n != j], 2):
            values.append(smooth_l1(angle(s, i, j, k) - angle(t, i, j, k)))
    return sum(values) / len(values)


def naive_sp(s: torch.Tensor, t: torch.Tensor) -> float:
    b = len(s)

    def norm_gram(x):
        g = [[float(x[i].double() @ x[j].double()) for j in range(b)] for i in range(b)]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = norm_gram(s), norm_gram(t)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


NAIVE = {rkd_distance: naive_rkd_distance, rkd_angle: naive_rkd_angle, similarity_preserving: naive_sp}


def naive_attention_relation_kl(s, t, mask, heads: int) -> float:
    total, rows = 0.0, 0
    for b in range(s.shape[0]):
        keys = [k for k in range(s.shape[1]) if mask[b, k]]
        for q in keys:
            rows += 1
            for h in range(heads):
                logp = []
                for x in (s, t):
                    d_r = x.shape[-1] // heads
                    xh = x[b, :, h * d_r : (h + 1) * d_r].double()
                    scores = [float(xh[q] @ xh[k]) / math.sqrt(d_r) for k in keys]
                    lse = math.log(sum(math.exp(v) for v in scores))
                    logp.append([v - lse for v in scores])
                ls, lt = logp
                total += sum(math.exp(a) * (a - c) for a, c in zip(lt, ls))
    return total / (rows * heads)


# --------------------------------------------------------------------------------------------
# Pooling.
# --------------------------------------------------------------------------------------------


def test_masked_mean_pool_by_hand_and_padding_never_contributes():
    hidden = torch.tensor(
        [[[1.0, 2.0], [3.0, 4.0], [float("nan"), float("inf")]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]]
    )
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = masked_mean_pool(hidden, mask)
    assert torch.equal(out, torch.tensor([[2.0, 3.0], [0.0, 0.0]]))
    torch.testing.assert_close(masked_mean_pool(hidden[1:]), torch.tensor([[7.0, 8.0]]))

    h = hidden.clone().requires_grad_()
    masked_mean_pool(h, mask).sum().backward()
    assert torch.equal(h.grad[0, :, 0], torch.tensor([0.5, 0.5, 0.0]))
    assert (h.grad[1] == 0).all()
    assert masked_mean_pool(hidden.bfloat16(), mask).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Sample–sample relations.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", SAMPLE_LOSSES, ids=SAMPLE_IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_sample_losses_match_naive_reference(loss_fn, seed):
    s, t = pooled(seed)
    loss = loss_fn(s, t)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.item() > 0
    assert loss.item() == pytest.approx(NAIVE[loss_fn](s, t), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("loss_fn", SAMPLE_LOSSES, ids=SAMPLE_IDS)
def test_sample_losses_zero_when_equal(loss_fn):
    s, _ = pooled(2, hs=6)
    assert loss_fn(s, s.clone()).abs().item() <= 1e-6
    # RKD relations are invariant to scale and translation; SP to scale.
    if loss_fn is not similarity_preserving:
        assert loss_fn(s, 3.0 * s + 5.0).abs().item() <= 1e-5
    else:
        assert loss_fn(s, 3.0 * s).abs().item() <= 1e-6


def test_rkd_distance_by_hand():
    s = torch.tensor([[0.0], [1.0], [3.0]])  # d = 1, 3, 2; mean 2
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # d = 1, 2, 1; mean 4/3
    expected = (smooth_l1(1 / 2 - 3 / 4) + smooth_l1(3 / 2 - 2 * 3 / 4) + smooth_l1(2 / 2 - 3 / 4)) / 3
    assert rkd_distance(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_angle_by_hand():
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # right angle at sample 0, 45° at 1 and 2
    t = torch.tensor([[0.0], [1.0], [2.0]])  # collinear: cos = 1 at the ends, -1 in the middle
    r = 1 / math.sqrt(2)
    expected = (smooth_l1(0.0 - 1.0) + smooth_l1(r - (-1.0)) + smooth_l1(r - 1.0)) / 3
    assert rkd_angle(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_similarity_preserving_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # G = I
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # G = all ones -> rows / √2
    r = 1 / math.sqrt(2)
    expected = (2 * (1 - r) ** 2 + 2 * r**2) / 4
    assert similarity_preserving(s, t).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss_fn", SAMPLE_LOSSES, ids=SAMPLE_IDS)
def test_sample_losses_batch_permutation_invariance(loss_fn):
    s, t = pooled(3, b=6)
    s.requires_grad_()
    loss = loss_fn(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    sp = s.detach()[perm].requires_grad_()
    loss_p = loss_fn(sp, t[perm])
    (grad_p,) = torch.autograd.grad(loss_p, sp)
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(grad_p, grad[perm])


@pytest.mark.parametrize("loss_fn", SAMPLE_LOSSES, ids=SAMPLE_IDS)
def test_sample_mask_equals_dropping_samples(loss_fn):
    s, t = pooled(4, b=6)
    keep = torch.tensor([True, False, True, True, False, True])
    garbage = s.clone()
    garbage[~keep] = float("nan")
    garbage.requires_grad_()
    loss = loss_fn(garbage, t, keep)
    loss.backward()
    torch.testing.assert_close(loss, loss_fn(s[keep], t[keep]))
    assert torch.isfinite(garbage.grad).all() and (garbage.grad[~keep] == 0).all()


@pytest.mark.parametrize("loss_fn", SAMPLE_LOSSES, ids=SAMPLE_IDS)
def test_sample_losses_too_few_valid_samples_are_zero_and_connected(loss_fn):
    minimum = 3 if loss_fn is rkd_angle else 2
    s, t = pooled(5, b=4)
    for valid in range(minimum):
        keep = torch.zeros(4, dtype=torch.bool)
        keep[:valid] = True
        x = s.clone().requires_grad_()
        loss = loss_fn(x, t, keep)
        assert loss.item() == 0.0
        loss.backward()
        assert (x.grad == 0).all()
    keep = torch.zeros(4, dtype=torch.bool)
    keep[:3] = True  # (with 2 samples the one normalised RKD distance is 1 on both sides)
    assert loss_fn(s, t, keep).item() > 0


@pytest.mark.parametrize("loss_fn", SAMPLE_LOSSES, ids=SAMPLE_IDS)
def test_coincident_samples_have_finite_grads(loss_fn):
    s = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0], [1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss = loss_fn(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    x = torch.zeros(3, 2, requires_grad=True)
    loss_fn(x, torch.zeros(3, 2)).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("loss_fn", SAMPLE_LOSSES, ids=SAMPLE_IDS)
def test_sample_losses_teacher_detached_and_shape_errors(loss_fn):
    s, t = pooled(6)
    s.requires_grad_()
    t.requires_grad_()
    loss_fn(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    with pytest.raises(ShapeError):
        loss_fn(s, t[:4])
    with pytest.raises(ShapeError, match="mask"):
        loss_fn(s, t, torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("kind", KINDS)
def test_pooled_relation_loss_padding_and_permutation_invariance(kind):
    s, t, mask = tokens(7, b=5, length=4)
    mask[2] = False  # a fully masked sample is left out
    x = s.clone().requires_grad_()
    loss = pooled_relation_loss(x, t, mask, kind=kind)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() > 0

    keep = mask.any(-1)
    fn = dict(zip(KINDS, SAMPLE_LOSSES))[kind]
    torch.testing.assert_close(
        loss, fn(masked_mean_pool(s[keep], mask[keep]), masked_mean_pool(t[keep], mask[keep]))
    )

    # longer padding with garbage
    s_pad = torch.cat([s, torch.full((5, 3, 8), float("nan"))], 1).requires_grad_()
    t_pad = torch.cat([t, torch.full((5, 3, 12), 1e30)], 1)
    mask_pad = torch.cat([mask, torch.zeros(5, 3, dtype=torch.bool)], 1)
    loss_pad = pooled_relation_loss(s_pad, t_pad, mask_pad, kind=kind)
    (grad_pad,) = torch.autograd.grad(loss_pad, s_pad)
    torch.testing.assert_close(loss_pad, loss)
    torch.testing.assert_close(grad_pad[:, :4], grad)
    assert (grad_pad[:, 4:] == 0).all()

    # joint batch permutation
    perm = torch.tensor([4, 2, 0, 3, 1])
    xp = s[perm].clone().requires_grad_()
    loss_p = pooled_relation_loss(xp, t[perm], mask[perm], kind=kind)
    (grad_p,) = torch.autograd.grad(loss_p, xp)
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(grad_p, grad[perm])


@pytest.mark.parametrize("kind", KINDS)
def test_pooled_relation_loss_fully_masked(kind):
    s, t, _ = tokens(8)
    x = s.clone().requires_grad_()
    loss = pooled_relation_loss(x, t, torch.zeros(4, 5, dtype=torch.bool), kind=kind)
    assert loss.item() == 0.0
    loss.backward()
    assert (x.grad == 0).all()
    assert pooled_relation_loss(s, s.clone(), kind=kind).abs().item() <= 1e-6
    with pytest.raises(ConfigError, match="unknown relation kind"):
        pooled_relation_loss(s, t, kind="nope")


# --------------------------------------------------------------------------------------------
# MiniLM self-attention relations.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_relation_kl_matches_naive_reference(seed, heads):
    s, t, mask = tokens(seed)
    loss = attention_relation_kl(s, t, mask, num_relation_heads=heads)
    assert loss.dtype == torch.float32 and loss.item() > 0
    assert loss.item() == pytest.approx(naive_attention_relation_kl(s, t, mask, heads), rel=1e-4)
    full = torch.ones_like(mask)
    assert attention_relation_kl(s, t, num_relation_heads=heads).item() == pytest.approx(
        naive_attention_relation_kl(s, t, full, heads), rel=1e-4
    )


def test_attention_relation_kl_by_hand():
    # One sample, D = R = 1 (√d_r = 1). Student scores [[1, 0], [0, 0]]; teacher all zeros: uniform.
    s = torch.tensor([[[1.0], [0.0], [5.0]]])
    t = torch.zeros(1, 3, 1)
    mask = torch.tensor([[True, True, False]])
    e = math.e
    q0 = [e / (e + 1), 1 / (e + 1)]
    kl_row0 = sum(0.5 * math.log(0.5 / q) for q in q0)  # row 1 is uniform on both sides: 0
    loss = attention_relation_kl(s, t, mask, num_relation_heads=1)
    assert loss.item() == pytest.approx(kl_row0 / 2, rel=1e-6)
    assert attention_relation_kl(s, t, mask, num_relation_heads=1, num_valid=4).item() == pytest.approx(
        kl_row0 / 4, rel=1e-6
    )


def test_attention_relation_kl_zero_when_equal_and_nonnegative():
    s, _, mask = tokens(2, ds=8)
    for heads in (1, 2, 4, 8):
        assert attention_relation_kl(s, s.clone(), mask, num_relation_heads=heads).abs().item() <= 1e-6
    for seed in range(3):
        s, t, mask = tokens(seed)
        assert attention_relation_kl(s, 3 * t, mask, num_relation_heads=4).item() >= 0


def test_attention_relation_kl_padding_invariance_value_and_grads():
    s, t, mask = tokens(3)
    x = s.clone().requires_grad_()
    loss = attention_relation_kl(x, t, mask, num_relation_heads=4)
    (grad,) = torch.autograd.grad(loss, x)

    s_pad = torch.cat([s, torch.full((4, 3, 8), float("nan"))], 1).requires_grad_()
    t_pad = torch.cat([t, torch.full((4, 3, 12), 1e30)], 1)
    mask_pad = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], 1)
    loss_pad = attention_relation_kl(s_pad, t_pad, mask_pad, num_relation_heads=4)
    (grad_pad,) = torch.autograd.grad(loss_pad, s_pad)
    torch.testing.assert_close(loss_pad, loss)
    torch.testing.assert_close(grad_pad[:, :5], grad)
    assert (grad_pad[:, 5:] == 0).all()
    # padding in the middle of the original length (right-padded rows) never leaks either
    garbage = s.clone()
    garbage[~mask] = 1e4
    torch.testing.assert_close(attention_relation_kl(garbage, t, mask, num_relation_heads=4), loss)


def test_attention_relation_kl_batch_permutation_invariance():
    s, t, mask = tokens(4)
    perm = torch.tensor([2, 0, 3, 1])
    x = s.clone().requires_grad_()
    loss = attention_relation_kl(x, t, mask, num_relation_heads=2)
    (grad,) = torch.autograd.grad(loss, x)
    xp = s[perm].clone().requires_grad_()
    loss_p = attention_relation_kl(xp, t[perm], mask[perm], num_relation_heads=2)
    (grad_p,) = torch.autograd.grad(loss_p, xp)
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(grad_p, grad[perm])


def test_attention_relation_kl_fully_masked_is_zero_with_finite_grads():
    s, t, _ = tokens(5)
    x = s.clone().requires_grad_()
    loss = attention_relation_kl(x, t, torch.zeros(4, 5, dtype=torch.bool), num_relation_heads=4)
    assert loss.item() == 0.0
    loss.backward()
    assert (x.grad == 0).all()


def test_attention_relation_kl_gradient_accumulation_invariance():
    s, t, mask = tokens(6)
    x = s.clone().requires_grad_()
    whole = attention_relation_kl(x, t, mask, num_relation_heads=4)
    (grad_whole,) = torch.autograd.grad(whole, x)
    n = mask.sum()
    summed = sum(
        attention_relation_kl(x[i : i + 2], t[i : i + 2], mask[i : i + 2], num_relation_heads=4, num_valid=n)
        for i in (0, 2)
    )
    (grad_summed,) = torch.autograd.grad(summed, x)
    torch.testing.assert_close(summed, whole)
    torch.testing.assert_close(grad_summed, grad_whole)
    torch.testing.assert_close(
        attention_relation_kl(s, t, mask, num_relation_heads=4),
        attention_relation_kl(s, t, mask, num_relation_heads=4, num_valid=n),
    )


def test_attention_relation_kl_shapes_dtype_and_detach():
    s, t, mask = tokens(7, ds=8, dt=12)
    with pytest.raises(ShapeError, match=r"student width 8 is not divisible by num_relation_heads=3"):
        attention_relation_kl(s, t, mask, num_relation_heads=3)
    with pytest.raises(ShapeError, match=r"teacher width 12 is not divisible by num_relation_heads=8"):
        attention_relation_kl(s, t, mask, num_relation_heads=8)
    with pytest.raises(ShapeError):
        attention_relation_kl(s, t[:, :4], mask, num_relation_heads=4)
    with pytest.raises(ShapeError, match="mask"):
        attention_relation_kl(s, t, mask[:, :4], num_relation_heads=4)
    with pytest.raises(ConfigError):
        attention_relation_kl(s, t, mask, num_relation_heads=0)

    loss_bf16 = attention_relation_kl(s.bfloat16(), t.bfloat16(), mask, num_relation_heads=4)
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(
        loss_bf16, attention_relation_kl(s.bfloat16().float(), t.bfloat16().float(), mask, num_relation_heads=4)
    )
    x, y = s.clone().requires_grad_(), t.clone().requires_grad_()
    attention_relation_kl(x, y, mask, num_relation_heads=4).backward()
    assert y.grad is None and x.grad.abs().sum() > 0
