"""Feature-based KD losses and projections."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdistill.errors import ConfigError, ShapeError
from kdistill.losses.feature import FeatureProjections, LayerPair, hidden_cosine, hidden_mse

LOSSES = [hidden_mse, hidden_cosine]
IDS = ["mse", "cosine"]


def make(seed: int, b: int = 3, length: int = 5, hs: int = 6, ht: int = 6):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, length, hs, generator=g)
    t = torch.randn(b, length, ht, generator=g)
    mask = torch.rand(b, length, generator=g) > 0.3
    mask[0, 0] = True
    return s, t, mask


def naive(loss_fn, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Loop-based reference: mean over valid positions of the per-position value."""
    values = []
    for b in range(s.shape[0]):
        for pos in range(s.shape[1]):
            if not mask[b, pos]:
                continue
            x, y = s[b, pos].double(), t[b, pos].double()
            if loss_fn is hidden_mse:
                values.append(sum((x[h] - y[h]) ** 2 for h in range(len(x))) / len(x))
            else:
                dot = sum(x[h] * y[h] for h in range(len(x)))
                values.append(1 - dot / (math.sqrt(sum(v * v for v in x)) * math.sqrt(sum(v * v for v in y))))
    return torch.stack(values).mean() if values else torch.tensor(0.0, dtype=torch.float64)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nonnegative_and_matches_naive_reference(loss_fn, seed):
    s, t, mask = make(seed)
    loss = loss_fn(s, t, mask)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() >= 0
    torch.testing.assert_close(loss.double(), naive(loss_fn, s, t, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=IDS)
def test_zero_when_student_equals_teacher(loss_fn):
    s, _, mask = make(3)
    assert loss_fn(s, s.clone(), mask).abs().item() <= 1e-6
    assert loss_fn(s, s.clone()).abs().item() <= 1e-6
    projections = FeatureProjections([(LayerPair(1, 2), 6, 6)])
    proj = lambda h: projections(LayerPair(1, 2), h)  # noqa: E731
    assert loss_fn(s, s.clone(), mask, projection=proj).abs().item() <= 1e-6


def test_mse_value_by_hand():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    t = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    # per position: (1 + 4) / 2 = 2.5 and (4 + 9) / 2 = 6.5
    assert hidden_mse(s, t).item() == pytest.approx((2.5 + 6.5) / 2)
    assert hidden_mse(s, t, torch.tensor([[True, False]])).item() == pytest.approx(2.5)
    assert hidden_mse(s, t, num_valid=4).item() == pytest.approx((2.5 + 6.5) / 4)


def test_cosine_value_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, -2.0], [6.0, 8.0]])
    # 1 - 1/√2, 1 - (-1) = 2, 1 - 1 = 0
    expected = ((1 - 1 / math.sqrt(2)) + 2 + 0) / 3
    assert hidden_cosine(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_cosine_zero_vectors_are_finite():
    s = torch.zeros(2, 3, 4, requires_grad=True)
    t = torch.zeros(2, 3, 4)
    t[0] = 1.0
    loss = hidden_cosine(s, t)
    loss.backward()
    assert loss.item() == pytest.approx(1.0)  # cos = 0 when either side is zero
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("loss_fn", LOSSES, ids=IDS)
def test_padding_invariance_value_and_grads(loss_fn):
    s, t, mask = make(4, hs=4, ht=6)
    proj_layer = torch.nn.Linear(4, 6)
    s = s.requires_grad_()
    loss = loss_fn(s, t, mask, projection=proj_layer)
    (grad,) = torch.autograd.grad(loss, s)

    extra = 3
    garbage_s = torch.full((3, extra, 4), float("nan"))
    garbage_t = torch.full((3, extra, 6), 1e30)
    s_pad = torch.cat([s.detach(), garbage_s], 1).requires_grad_()
    t_pad = torch.cat([t, garbage_t], 1)
    mask_pad = torch.cat([mask, torch.zeros(3, extra, dtype=torch.bool)], 1)
    loss_pad = loss_fn(s_pad, t_pad, mask_pad, projection=proj_layer)
    (grad_pad,) = torch.autograd.grad(loss_pad, s_pad)

    torch.testing.assert_close(loss_pad, loss)
    torch.testing.assert_close(grad_pad[:, :5], grad)
    assert (grad_pad[:, 5:] == 0).all()


@pytest.mark.parametrize("loss_fn", LOSSES, ids=IDS)
def test_fully_masked_is_exactly_zero_with_finite_grads(loss_fn):
    s, t, _ = make(5, hs=4, ht=6)
    s = s.requires_grad_()
    proj_layer = torch.nn.Linear(4, 6)
    loss = loss_fn(s, t, torch.zeros(3, 5, dtype=torch.bool), projection=proj_layer)
    assert loss.item() == 0.0
    loss.backward()
    assert (s.grad == 0).all()
    assert all(p.grad is not None and (p.grad == 0).all() for p in proj_layer.parameters())


@pytest.mark.parametrize("loss_fn", LOSSES, ids=IDS)
def test_gradient_accumulation_invariance(loss_fn):
    s, t, mask = make(6, b=4, hs=4, ht=6)
    torch.manual_seed(0)
    proj_layer = torch.nn.Linear(4, 6)
    s = s.requires_grad_()
    whole = loss_fn(s, t, mask, projection=proj_layer)
    grads_whole = torch.autograd.grad(whole, [s, *proj_layer.parameters()])

    n = mask.sum()
    halves = [loss_fn(s[i : i + 2], t[i : i + 2], mask[i : i + 2], projection=proj_layer, num_valid=n) for i in (0, 2)]
    summed = halves[0] + halves[1]
    grads_summed = torch.autograd.grad(summed, [s, *proj_layer.parameters()])
    torch.testing.assert_close(summed, whole)
    for a, b in zip(grads_summed, grads_whole):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=IDS)
def test_default_count_equals_explicit_num_valid(loss_fn):
    s, t, mask = make(7)
    torch.testing.assert_close(loss_fn(s, t, mask), loss_fn(s, t, mask, num_valid=mask.sum()))


@pytest.mark.parametrize("loss_fn", LOSSES, ids=IDS)
def test_width_mismatch_without_projection_names_both_widths(loss_fn):
    s, t, mask = make(8, hs=4, ht=6)
    with pytest.raises(ShapeError, match=r"student width 4.*teacher width 6"):
        loss_fn(s, t, mask)
    with pytest.raises(ShapeError, match=r"projected student width 5.*teacher width 6"):
        loss_fn(s, t, mask, projection=torch.nn.Linear(4, 5))
    with pytest.raises(ShapeError):
        loss_fn(s, t[:, :4], mask)
    with pytest.raises(ShapeError, match="mask"):
        loss_fn(s, t, mask[:, :4], projection=torch.nn.Linear(4, 6))


@pytest.mark.parametrize("loss_fn", LOSSES, ids=IDS)
def test_teacher_is_detached_and_projection_trains(loss_fn):
    s, t, mask = make(9, hs=4, ht=6)
    s.requires_grad_()
    t.requires_grad_()
    projections = FeatureProjections([(LayerPair(2, 4), 4, 6)])
    loss = loss_fn(s, t, mask, projection=lambda h: projections(LayerPair(2, 4), h))
    loss.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projections.parameters())


@pytest.mark.parametrize("loss_fn", LOSSES, ids=IDS)
def test_low_precision_inputs_compute_in_fp32(loss_fn):
    s, t, mask = make(10)
    loss_bf16 = loss_fn(s.bfloat16(), t.bfloat16(), mask)
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(loss_bf16, loss_fn(s.bfloat16().float(), t.bfloat16().float(), mask))


def test_unbatched_and_per_example_leading_shapes():
    s, t, _ = make(11)
    torch.testing.assert_close(hidden_mse(s[0, 0], t[0, 0]), F.mse_loss(s[0, 0], t[0, 0]))
    torch.testing.assert_close(hidden_mse(s[:, 0], t[:, 0]), F.mse_loss(s[:, 0], t[:, 0]))


# --------------------------------------------------------------------------------------------
# LayerPair and FeatureProjections.
# --------------------------------------------------------------------------------------------


def test_layer_pair_names_are_module_dict_keys_and_distinct():
    pairs = [LayerPair(3, 6), LayerPair("3", 6), LayerPair("encoder.layer.3", "encoder.layer.6"), LayerPair(-1, -1)]
    names = [p.name for p in pairs]
    assert len(set(names)) == len(names)
    assert all("." not in n for n in names)
    d = torch.nn.ModuleDict({n: torch.nn.Identity() for n in names})
    assert list(d.keys()) == names
    assert LayerPair(3, 6) == LayerPair(3, 6) and hash(LayerPair(3, 6)) == hash(LayerPair(3, 6))
    with pytest.raises(AttributeError):
        LayerPair(3, 6).student = 4  # frozen
    with pytest.raises(ConfigError):
        LayerPair(3.0, 6)  # type: ignore[arg-type]


def test_projections_identity_where_equal_linear_where_different():
    equal, wider = LayerPair(1, 2), LayerPair("encoder.layer.1", "encoder.layer.3")
    torch.manual_seed(0)
    projections = FeatureProjections([(equal, 8, 8), (wider, 4, 8)])
    assert projections.is_identity(equal) and not projections.is_identity(wider)
    assert set(projections.proj.keys()) == {wider.name}
    assert sum(p.numel() for p in projections.parameters()) == 4 * 8 + 8
    x = torch.randn(2, 3, 8)
    assert projections(equal, x) is x
    y = projections(wider, torch.randn(2, 3, 4))
    assert y.shape == (2, 3, 8)
    with pytest.raises(ShapeError, match="width 5"):
        projections(wider, torch.randn(2, 3, 5))
    with pytest.raises(ConfigError, match="unknown layer pair"):
        projections(LayerPair(0, 0), x)
    with pytest.raises(ConfigError, match="once"):
        FeatureProjections([(equal, 8, 8), (LayerPair(1, 2), 8, 8)])


def test_projections_deterministic_init_and_state_dict_round_trip():
    spec = [(LayerPair(1, 2), 4, 6), (LayerPair(2, 4), 6, 6), (LayerPair(3, 6), 6, 3)]
    torch.manual_seed(123)
    a = FeatureProjections(spec)
    torch.manual_seed(123)
    same = FeatureProjections(spec)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), same.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)

    torch.manual_seed(999)
    b = FeatureProjections(spec)
    x = torch.randn(2, 4)
    assert not torch.equal(a(LayerPair(1, 2), x), b(LayerPair(1, 2), x))
    b.load_state_dict(a.state_dict())
    for pair, hs, _ in spec:
        x = torch.randn(2, hs)
        torch.testing.assert_close(b(pair, x), a(pair, x))
    assert all("." not in k.split(".", 1)[1].rsplit(".", 1)[0] for k in a.state_dict())
