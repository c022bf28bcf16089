"""Closed-form value and gradient of the common chunked response terms: no autograd graph.

Per row, with student logits x at temperature T, q = softmax(x / T), s = log q, and the
teacher's p (dense: softmax of its logits / T; sparse: p_k at ids k, P = Σ_k p_k ≤ 1):

| term                                   | value               | ∂value / ∂x                    |
|----------------------------------------|---------------------|--------------------------------|
| ``forward_kl``, dense p                | Σ p (log p − s)     | (q − p) / T                    |
| ``soft_ce``, dense p                   | −Σ p s              | (q − p) / T                    |
| any kind, sparse p (any missing mass)  | F(s[ids])           | (Σ_k G_k e_k − (Σ_k G_k) q) / T |

For sparse targets the value F depends on the student only through its k log-probs at the
target ids, so G = ∂F/∂s[ids] (c, k) comes from autograd on that small tensor (the same code as
:func:`~kdistill.losses.response.block_loss_sum`), and ∂s[id]/∂x = (e_id − q)/T carries it to
the logits. E.g. hard-label cross-entropy (one id, p = 1): G = −1, ∂ = (q − e_y)/T. The head's transform
x = cap · tanh(scale · z / cap) is differentiated in closed form too: ∂z = ∂x · scale · (1 − (x/cap)²).

A chunk of KD + CE then costs a few passes over its (c × V) logits (two log-softmaxes, two
exps, one dot product, two in-place updates) instead of autograd's graph of masked ops and
their backward, and keeps fewer (c × V) temporaries alive. Values equal
:func:`kdistill.losses.response.block_loss_sum` and gradients equal autograd's to fp32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from kdistill.losses.response import DistributionSpec, SparseTargets, per_position_divergence, support_logprobs
from kdistill.losses.workspace import Workspace

if TYPE_CHECKING:
    from kdistill.losses.chunked import LMHead


class ChunkPart(Protocol):
    """One term of a fused chunked pass, as :mod:`kdistill.losses.chunked` holds it."""

    rows: Callable[..., Tensor | SparseTargets]  # rows(a, b, workspace, name)
    spec: DistributionSpec
    vocab: int
    coef: float


def has_closed_form(teacher: object, spec: DistributionSpec) -> bool:
    """Whether a term with these targets and this divergence takes the closed-form path."""
    return isinstance(teacher, SparseTargets) or spec.kind in ("forward_kl", "soft_ce")


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """(c, V) · (c, V) → (c,) row-wise dot products in one pass (a batched GEMV, no temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def closed_form_chunk(
    z: Tensor, head: LMHead, parts: Sequence[ChunkPart], a: int, stop: int, workspace: Workspace
) -> tuple[Tensor, Tensor] | None:
    """Values and gradient of one chunk of rows a:stop for terms that all have a closed form.

    z: (c, V) pre-transform student logits of ``head`` (its scale and soft-cap still to apply), a
    workspace buffer that may be overwritten; parts: the terms (:func:`has_closed_form` true for
    each); workspace: scratch buffers. Returns ``(sums, grad)``: sums (n_parts,) fp32 = each
    term's Σ_rows value (no coefficient), grad (c, V) = ∂(Σ_t coef_t · sums_t)/∂z in z's dtype,
    in a workspace buffer (valid until the next chunk). Returns None where a value is not finite
    (−inf logits: 0 · ∞ needs the masked autograd path).

    Memory: on a CPU the log-softmaxes run in place in buffers this pass owns, and p = exp(log p)
    overwrites log p a few rows at a time, so the usual KD + CE chunk holds two (c × V) buffers
    (student logits → log q → gradient; teacher logits → log p → p).
    """
    x = head.transform(z).float()  # (c, V); z itself when fp32 without scale or cap
    c, width = x.shape
    sums = torch.zeros(len(parts), dtype=torch.float32, device=z.device)
    grad: Tensor | None = None
    groups: dict[tuple[float, int], list[int]] = {}
    for i, part in enumerate(parts):
        groups.setdefault((part.spec.temperature, part.vocab), []).append(i)
    # x may be overwritten by the one group's log q unless the soft-cap's derivative needs it
    x_free = len(groups) == 1 and head.softcap is None
    for g_index, ((temperature, vocab), members) in enumerate(groups.items()):
        xs = x[:, :vocab]
        src = _tempered(xs, temperature, workspace, f"tempered_student{g_index}")
        may_overwrite = src is not xs or (x_free and vocab == width)
        logq = _log_softmax(src, may_overwrite, workspace, f"logq{g_index}")
        q_coef = torch.zeros(c, dtype=torch.float32, device=z.device)  # Σ_t coef_t / T · (1 or −Σ_k G_k)
        dense: list[tuple[Tensor, float]] = []  # (p, coef / T): subtracted from the gradient
        sparse: list[tuple[Tensor, Tensor]] = []  # (ids, coef / T · G): scattered into it
        for i in members:
            part = parts[i]
            weight = part.coef / temperature
            target = part.rows(a, stop, workspace, f"target{i}")
            if isinstance(target, SparseTargets):  # autograd on the (c, k) support only
                ids = target.ids.clamp_min(0)
                s_sel = logq.gather(-1, ids).requires_grad_(True)
                with torch.enable_grad():
                    t, s = support_logprobs(s_sel, target, part.spec.missing_mass)
                    value = per_position_divergence(t, s, part.spec.kind, beta=part.spec.beta,
                                                    alpha=part.spec.alpha).sum()
                (g_sel,) = torch.autograd.grad(value, s_sel)  # (c, k): ∂value/∂s at the ids
                sums[i] = value.detach()
                q_coef -= weight * g_sel.sum(-1)
                sparse.append((ids, g_sel.mul_(weight)))
                continue
            t_src = target[:, :vocab].float()
            t_src = _tempered(t_src, temperature, workspace, f"tempered_target{i}")
            logp = _log_softmax(t_src, workspace.owns(t_src), workspace, f"logp{i}")
            sums[i] = _dense_value(logp, logq, part.spec.kind == "forward_kl", workspace)  # logp → p
            q_coef += weight
            dense.append((logp, weight))
        g = logq.exp_().mul_(q_coef.unsqueeze(1))  # logq's buffer becomes this group's gradient
        for p, weight in dense:
            g.sub_(p, alpha=weight)
        for ids, values in sparse:
            g.scatter_add_(-1, ids, values)
        if grad is None and vocab == width:
            grad = g
        else:
            if grad is None:
                grad = workspace.get("grad", c, width, torch.float32, x.device).zero_()
            grad[:, :vocab] += g
    if not bool(torch.isfinite(sums).all()):
        return None
    assert grad is not None  # at least one part
    if head.softcap is not None:  # ∂x/∂z = scale · (1 − (x / cap)²)
        grad.mul_(torch.square(x / head.softcap).neg_().add_(1.0))
    if head.scale != 1.0:
        grad.mul_(head.scale)
    return sums, grad.to(z.dtype)


def _tempered(x: Tensor, temperature: float, workspace: Workspace, name: str) -> Tensor:
    """fp32 (c, V) logits / T, into a workspace buffer when T ≠ 1 (``x`` itself at T = 1)."""
    if temperature == 1.0:
        return x
    return torch.div(x, temperature, out=workspace.get(name, x.shape[0], x.shape[1], x.dtype, x.device))


def _log_softmax(src: Tensor, may_overwrite: bool, workspace: Workspace, name: str) -> Tensor:
    """Row log-softmax of (c, V) ``src``: in place where allowed on a CPU (bit-identical there),
    else into the workspace buffer ``name``."""
    if may_overwrite and src.device.type == "cpu" and src.is_contiguous():
        return torch.log_softmax(src, -1, out=src)
    return torch.log_softmax(src, -1, out=workspace.get(name, src.shape[0], src.shape[1], torch.float32, src.device))


ROW_BLOCK_ELEMENTS = 2**21  # 8 MiB of fp32 per row block: stays in cache


def _dense_value(logp: Tensor, logq: Tensor, kl: bool, workspace: Workspace) -> Tensor:
    """Σ_rows of Σ p (log p − log q) (``kl``) or −Σ p log q, turning ``logp``'s buffer into p.

    Runs a block of rows at a time (``ROW_BLOCK_ELEMENTS``) through one small buffer, so p needs
    no (c × V) buffer of its own. Returns a 0-dim fp32 tensor.
    """
    c, vocab = logp.shape
    step = max(1, min(c, ROW_BLOCK_ELEMENTS // max(vocab, 1)))
    scratch = workspace.get("p_rows", step, vocab, torch.float32, logp.device)
    total = torch.zeros((), dtype=torch.float32, device=logp.device)
    for r in range(0, c, step):
        lp, lq = logp[r : r + step], logq[r : r + step]
        p = torch.exp(lp, out=scratch[: lp.shape[0]])
        total += _rowdot(p, lp.sub_(lq)).clamp_min(0.0).sum() if kl else -_rowdot(p, lq).sum()
        lp.copy_(p)
    return total
