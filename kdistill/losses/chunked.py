"""Chunked response loss for language models: no (tokens × vocabulary) tensor is ever kept.

Given the student's final hidden states and its output head, the loss is computed over chunks
of valid tokens. Each chunk's logits exist only while that chunk is processed: the chunk's
contribution to the gradient of the hidden states and of the head is computed right then
(in closed form where there is one, :mod:`kdistill.losses.closed_form`; else autograd on the
chunk) and accumulated, so backward costs no recomputation and peak memory is one chunk of logits
(``chunk_size × V``) instead of all of them. The value and the gradients equal
:func:`kdistill.losses.response.distribution_loss` on the full logits (the autograd path runs the
same code, :func:`kdistill.losses.response.block_loss_sum` per chunk with one normalisation at the
end; the closed form is tested equal to it).

Output heads may scale and soft-cap logits (:class:`LMHead`): Gemma 2/3 use
``cap · tanh(z / cap)`` (``final_logit_softcapping``), Cohere multiplies by ``logit_scale``,
Granite divides by ``logits_scaling``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdistill.errors import ShapeError
from kdistill.losses.closed_form import closed_form_chunk, has_closed_form
from kdistill.losses.projection import logits_dtype, matmul_dtype, project_into
from kdistill.losses.reduce import check_mask, select_valid
from kdistill.losses.response import (
    DistributionSpec,
    SparseTargets,
    block_loss_sum,
    check_targets,
    mixture_logits,
    shared_vocab_size,
)
from kdistill.losses.workspace import Workspace


@dataclass(frozen=True)
class LMHead:
    """An output head: ``logits = softcap · tanh(scale · (h Wᵀ + b) / softcap)``.

    weight: (V, H); bias: (V,) or None; scale: multiplier before capping; softcap: None for none.
    """

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale: float = 1.0, softcap: float | None = None) -> LMHead:
        return cls(linear.weight, linear.bias, scale, softcap)

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def project(self, hidden: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                out: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """(N, H) -> (N, V) pre-transform logits ``z = h Wᵀ + b``, optionally with stand-in tensors;
        into ``out`` if given (no autograd; the GEMM in ``dtype``, default ``out.dtype``;
        vocabulary-blocked on a CPU, see ``project_into``)."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        if out is not None:
            return project_into(hidden, weight, bias, out, dtype)
        return hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())

    def transform(self, z: Tensor) -> Tensor:
        """Scaling and soft-capping: ``softcap · tanh(scale · z / softcap)``."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def transform_(self, z: Tensor) -> Tensor:
        """:meth:`transform` in place on ``z`` (no autograd), the same operations in the same order."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def logits(self, hidden: Tensor, out: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """(N, H) -> (N, V) logits; the product written into ``out`` if given (see ``project``)."""
        return self.transform(self.project(hidden, out=out, dtype=dtype))


@dataclass(frozen=True)
class HiddenTargets:
    """Dense teacher targets given as its final hidden states and head: logits made per chunk.

    hidden: (*lead, H_T); head: the teacher's :class:`LMHead`. Computed under ``no_grad``.
    """

    hidden: Tensor
    head: LMHead


@dataclass(frozen=True)
class EnsembleHiddenTargets:
    """Several teachers' hidden states and heads with weights (summing to 1): per chunk, the
    target is the mixture of their distributions (:func:`~kdistill.losses.response.mixture_logits`)."""

    members: tuple[HiddenTargets, ...]
    weights: tuple[float, ...]


Teacher = Tensor | SparseTargets | HiddenTargets | EnsembleHiddenTargets


TeacherRows = Callable[..., Tensor | SparseTargets]  # rows(a, b, workspace=None, name="teacher")


def _teacher_rows(teacher: Teacher, mask: Tensor | None, lead_ndim: int, temperature: float) -> TeacherRows:
    """Return ``rows(a, b, workspace=None, name="teacher")`` giving the teacher targets of valid
    rows a:b (logits or sparse); logits made from hidden states go into the workspace's buffer
    ``name`` if a workspace is given (valid until that buffer's next use)."""
    if isinstance(teacher, SparseTargets):
        flat = teacher.select(mask, lead_ndim)
        return lambda a, b, workspace=None, name="teacher": flat.rows(a, b)
    if isinstance(teacher, EnsembleHiddenTargets):
        members = [_teacher_rows(m, mask, lead_ndim, temperature) for m in teacher.members]
        return lambda a, b, workspace=None, name="teacher": mixture_logits(
            [rows(a, b) for rows in members], list(teacher.weights), temperature)
    if isinstance(teacher, HiddenTargets):
        hidden = select_valid(teacher.hidden, mask, lead_ndim)
        head = teacher.head
        dtype = matmul_dtype(hidden, head.weight)  # the GEMM's, fixed here: rows may run with autocast off
        out_dtype = logits_dtype(dtype)

        def rows(a: int, b: int, workspace: Workspace | None = None, name: str = "teacher") -> Tensor:
            shape = (b - a, head.vocab)
            out = (torch.empty(shape, dtype=out_dtype, device=head.weight.device) if workspace is None
                   else workspace.get(name, *shape, out_dtype, head.weight.device))
            with torch.no_grad():
                return head.logits(hidden[a:b], out=out, dtype=dtype)

        return rows
    logits = select_valid(teacher, mask, lead_ndim)
    return lambda a, b, workspace=None, name="teacher": logits[a:b]


CHUNK_LOGITS = 2**25  # logits per chunk by default: 128 MiB in fp32


def auto_chunk_size(vocab: int) -> int:
    """Tokens per chunk so that one chunk holds about ``CHUNK_LOGITS`` logits (16 to 4096)."""
    return max(16, min(4096, CHUNK_LOGITS // max(vocab, 1)))


@dataclass(frozen=True)
class ChunkedTerm:
    """One response term of a fused chunked pass (:func:`chunked_distribution_losses`).

    teacher: (*lead, V_T) logits, :class:`HiddenTargets`, :class:`EnsembleHiddenTargets` or
    :class:`SparseTargets` (*lead, k); spec: the divergence and its options; num_valid: the
    count that normalises the term (default: this call's valid rows); weight: its weight in the sum.
    """

    teacher: Teacher
    spec: DistributionSpec = DistributionSpec()
    num_valid: Tensor | float | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class _Part:
    rows: TeacherRows
    spec: DistributionSpec
    vocab: int
    coef: float  # weight · T² / count: this term's factor in the fused loss


class _ChunkedLoss(torch.autograd.Function):
    """Σ_terms coef · Σ_rows divergence over chunks; gradients computed per chunk in forward,
    scaled in backward. Outputs: the fused loss and, without gradient, each term's Σ_rows."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head, parts, chunk_size, fast):  # type: ignore[override]
        # Per chunk: z = h Wᵀ + b, g = ∂loss/∂z (in closed form where every term has one, see
        # kdistill.losses.closed_form; else autograd through transform + divergences only), then
        # ∂h = g W, ∂W += gᵀ h (accumulated inside the GEMM: no extra pass over W), ∂b += Σ g.
        # GEMMs in the matmul dtype (autocast's under mixed precision: bf16 GEMMs), every
        # element-wise step (softmaxes, the divergences, the gradient of z) on fp32 logits with
        # autocast off, so none of them rounds to bf16.
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        mm = matmul_dtype(hidden, weight)
        h_all, w = hidden.detach().to(mm), weight.detach().to(mm)  # cast once, not per chunk
        b = None if bias is None else bias.detach()
        grad_h = torch.zeros(h_all.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        # ∂W is written by the first chunk's GEMM (no zero pass over V × H) unless there is none
        new_grad_w = torch.empty if h_all.shape[0] else torch.zeros
        grad_w = new_grad_w(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if need_b else None
        sums = torch.zeros(len(parts), dtype=torch.float32, device=hidden.device)
        workspace = Workspace()
        with torch.autocast(hidden.device.type, enabled=False):
            for a in range(0, h_all.shape[0], chunk_size):
                stop = min(a + chunk_size, h_all.shape[0])
                h = h_all[a:stop]
                z_buffer = workspace.get("z", stop - a, w.shape[0], logits_dtype(mm), w.device)
                z = head.project(h, w, b, out=z_buffer, dtype=mm)  # (c, V)
                closed = closed_form_chunk(z, head, parts, a, stop, workspace) if fast else None
                if closed is not None:
                    chunk_sums, g = closed
                else:  # z again: the closed form may have overwritten its buffer
                    z = head.project(h, w, b, out=z_buffer, dtype=mm).detach().requires_grad_(True)
                    with torch.enable_grad():
                        logits = head.transform(z)
                        terms = [block_loss_sum(logits, p.rows(a, stop), p.spec, p.vocab) for p in parts]
                        loss = sum(p.coef * t for p, t in zip(parts, terms))
                    (g,) = torch.autograd.grad(loss, z)
                    chunk_sums = torch.stack([t.detach() for t in terms])
                    del loss, logits, terms
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(mm)
                if need_h:
                    grad_h[a:stop] = g @ w
                if need_w and mm == torch.float32:
                    if a == 0:
                        torch.mm(g.t(), h, out=grad_w)
                    else:
                        grad_w.addmm_(g.t(), h)
                elif need_w:  # the GEMM in mm, accumulated in fp32
                    part = g.t() @ h  # (V, H)
                    if a == 0:
                        grad_w.copy_(part)
                    else:
                        grad_w.add_(part)
                sums += chunk_sums
                del z, g
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(sums)
        ctx.backward_done = False
        coefs = torch.tensor([p.coef for p in parts], dtype=torch.float32, device=hidden.device)
        return (coefs * sums).sum(), sums

    @staticmethod
    def backward(ctx, grad_out, _grad_sums):  # type: ignore[override]
        # The saved gradients are this graph's own: scaled in place (a fresh V × H tensor would cost
        # its page faults), so a second backward through the same graph is refused.
        if ctx.backward_done:
            raise RuntimeError("chunked loss: backward through the same graph twice is not supported")
        ctx.backward_done = True
        saved = iter(ctx.saved_tensors)
        out = []
        for need, dtype in zip(ctx.needs_input_grad[:3], ctx.dtypes):
            out.append(next(saved).mul_(grad_out).to(dtype) if need else None)
        return (*out, None, None, None, None)


def _check_term(term: ChunkedTerm, student_head: LMHead, lead: torch.Size) -> int:
    """Validate one term's targets against the student; return the compared vocabulary size."""
    teacher, spec = term.teacher, term.spec
    if isinstance(teacher, (HiddenTargets, EnsembleHiddenTargets)):
        members = teacher.members if isinstance(teacher, EnsembleHiddenTargets) else (teacher,)
        for member in members:
            if tuple(member.hidden.shape[:-1]) != tuple(lead):
                raise ShapeError(
                    f"teacher hidden states have shape {tuple(member.hidden.shape)}, "
                    f"student's leading shape is {tuple(lead)}"
                )
            vocab = shared_vocab_size(student_head.vocab, member.head.vocab, spec.vocab_size)
        return vocab
    return check_targets(teacher, lead, spec, student_head.vocab)


def chunked_distribution_losses(
    student_hidden: Tensor,
    student_head: LMHead,
    terms: list[ChunkedTerm],
    mask: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Several response losses of one student over the same positions, in one chunked pass.

    Each chunk's logits are made once and every term is computed from them; the gradient of the
    weighted sum is taken in the same pass. So KD + hard-label CE (or several divergences) cost
    one pass over the vocabulary, not one per term.

    student_hidden: (*lead, H_S); student_head: its :class:`LMHead` with weight (V_S, H_S);
    terms: :class:`ChunkedTerm` each; mask: (*lead) bool valid positions, shared by the terms.
    Returns ``(Σ_t weight_t · loss_t, [loss_t])``: the first with gradients, the list detached, each
    ``loss_t = T_t² · Σ_valid divergence_t / num_valid_t`` (0-dim fp32).
    """
    if not terms:
        raise ShapeError("chunked_distribution_losses: no terms")
    if chunk_size is None:
        chunk_size = auto_chunk_size(student_head.vocab)
    if chunk_size < 1:
        raise ShapeError(f"chunk_size must be ≥ 1, got {chunk_size}")
    if student_hidden.shape[-1] != student_head.weight.shape[1]:
        raise ShapeError(
            f"student hidden width {student_hidden.shape[-1]} does not match its head "
            f"{tuple(student_head.weight.shape)}"
        )
    lead = student_hidden.shape[:-1]
    mask = check_mask(mask, lead, "chunked_distribution_loss")
    hidden = select_valid(student_hidden, mask, len(lead))
    n = hidden.shape[0]
    # loss_t = scale_t · Σ_rows divergence_t, scale_t = T² / max(num_valid_t, 1)
    scales = [t.spec.t2 / max(float(n if t.num_valid is None else t.num_valid), 1.0) for t in terms]
    parts = [_Part(_teacher_rows(t.teacher, mask, len(lead), t.spec.temperature), t.spec,
                   _check_term(t, student_head, lead), t.weight * scale)
             for t, scale in zip(terms, scales)]
    params = (hidden, student_head.weight, student_head.bias)
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
        fast = all(has_closed_form(t.teacher, t.spec) for t in terms)
        total, sums = _ChunkedLoss.apply(*params, student_head, parts, chunk_size, fast)
    else:
        sums = torch.zeros(len(parts), dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for a in range(0, n, chunk_size):
                stop = min(a + chunk_size, n)
                logits = student_head.logits(hidden[a:stop])
                sums += torch.stack([block_loss_sum(logits, p.rows(a, stop), p.spec, p.vocab) for p in parts])
        total = sum(p.coef * sums[i] for i, p in enumerate(parts))
    values = [sums[i] * scale for i, scale in enumerate(scales)]
    return total, values


def chunked_distribution_loss(
    student_hidden: Tensor,
    student_head: LMHead,
    teacher: Teacher,
    mask: Tensor | None = None,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    num_valid: Tensor | float | None = None,
    vocab_size: int | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    missing_mass: str = "tail",
    chunk_size: int | None = None,
) -> Tensor:
    """Response KD loss from the student's hidden states, chunk by chunk.

    student_hidden: (*lead, H_S); student_head: its :class:`LMHead` with weight (V_S, H_S).
    teacher: (*lead, V_T) logits, :class:`HiddenTargets` (hidden + head, logits per chunk), or
        :class:`SparseTargets` (*lead, k).
    mask, num_valid and the divergence options as in :func:`~kdistill.losses.response.distribution_loss`.
    chunk_size: valid tokens per chunk (default: about ``CHUNK_LOGITS`` logits per chunk, e.g. 128
        tokens at V = 262,144); peak extra memory ≈ a few × chunk_size × V × 4 bytes.
    Returns 0-dim fp32 ``T² · Σ_valid divergence / num_valid``.
    """
    spec = DistributionSpec(kind, temperature, scale_by_t2, beta, alpha, missing_mass, vocab_size)
    total, _ = chunked_distribution_losses(student_hidden, student_head, [ChunkedTerm(teacher, spec, num_valid)],
                                           mask, chunk_size=chunk_size)
    return total
