"""Response-based KD: divergences between teacher and student output distributions.

Notation, per position (token or example) over the categories of the last dimension:
``t = log p_T`` and ``s = log p_S`` (log-probabilities at temperature T), ``p = p_T``, ``q = p_S``.

| kind              | per-position value                                            |
|-------------------|---------------------------------------------------------------|
| ``forward_kl``    | KL(p‖q) = Σ p (t − s)                                          |
| ``reverse_kl``    | KL(q‖p) = Σ q (s − t)                                          |
| ``jsd``           | [β KL(p‖m) + (1−β) KL(q‖m)] / (β(1−β)),  m = β p + (1−β) q     |
| ``skew_forward_kl`` | KL(p ‖ α p + (1−α) q)                                       |
| ``skew_reverse_kl`` | KL(q ‖ α q + (1−α) p)                                       |
| ``tvd``           | ½ Σ |p − q|                                                    |
| ``soft_ce``       | −Σ p s  (= KL(p‖q) + H(p))                                     |

``jsd`` is the generalized Jensen–Shannon divergence of GKD divided by β(1−β): the same family,
scaled so that it is continuous on [0, 1] with β = 0 giving KL(p‖q) and β = 1 giving KL(q‖p)
exactly (the unscaled form collapses to 0 at both ends; at β = ½ the scaled form is 4·JSD).
The mixture is computed in log space through ``log(m/p) = log1p((1−β)·expm1(s − t))``, which has
no cancellation near the end points.

Reduction (see :mod:`kdistill.losses.reduce`): ``T² · Σ_valid value / num_valid``; the T² factor
keeps soft-target gradients from shrinking as 1/T² (Hinton et al., 2015) and can be switched off.
All maths runs in fp32 whatever the input dtype.

Targets are **dense** (teacher logits, ``(*lead, V_T)``) or **sparse** (:class:`SparseTargets`:
the teacher's top-k ids with log-probabilities normalised over its full vocabulary). For sparse
targets the student's full-vocabulary log-probabilities are gathered at the ids and the mass
outside the support follows ``missing_mass``:

- ``"tail"`` (default): the outside mass is one more category, ``log(1 − Σ_k p)`` for the teacher
  and ``log(1 − Σ_k q)`` for the student, so a student that moves mass off the support pays;
- ``"renormalize"``: both distributions are renormalised over the support;
- ``"ignore"`` (``soft_ce`` only): ``−Σ_k p log q`` with the student's full-vocabulary
  log-probabilities; with one-hot targets (k = 1, log p = 0) this is the hard-label cross-entropy.

Tail masses below ``TAIL_FLOOR`` are raised to it on both sides: an fp32 sum of k ≈ V
probabilities is 1 only to about that precision. With k = V both policies equal the dense loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import ConfigError, ShapeError
from kdistill.losses.reduce import check_mask, normalise, select_valid
from kdistill.losses.registry import register_loss

DivergenceKind = Literal[
    "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "soft_ce"
]
MissingMass = Literal["tail", "renormalize", "ignore"]
DIVERGENCES: tuple[str, ...] = DivergenceKind.__args__  # type: ignore[attr-defined]
TAIL_FLOOR = 1e-6
_BETA_EPS = 1e-12  # |JSD(β) − KL| = O(β): below this β the end point is exact to fp32 precision
_MAX_LOG_RATIO = 80.0  # exp(80) is finite in fp32; larger log-ratios only meet probabilities < e^-80


# --------------------------------------------------------------------------------------------
# Per-position divergences on log-probabilities: (N, C) x (N, C) -> (N,), fp32.
# --------------------------------------------------------------------------------------------


def _p_times(t: Tensor, x: Tensor) -> Tensor:
    """exp(t) · x with 0 where exp(t) = 0 (so that 0 · ±inf contributes 0, as 0 log 0 = 0)."""
    return torch.where(t == -math.inf, 0.0, t.exp() * x)


def _kl(t: Tensor, s: Tensor) -> Tensor:
    """KL(p‖q) = Σ p (t − s) per row."""
    return _p_times(t, t - s).sum(-1).clamp_min(0.0)


def _kl_to_mixture(t: Tensor, s: Tensor, w: float) -> Tensor:
    """KL(p ‖ w p + (1−w) q) per row, for 0 ≤ w < 1, without cancellation.

    With m = w p + (1−w) q: KL(p‖m) = Σ [(m − p) − p log(m/p)] (the added terms sum to 0 and make
    every summand ≥ 0), m − p = (1−w)(q − p), log(m/p) = log1p((1−w)·expm1(s − t)) where m/p > 1/2
    (no cancellation near equality), else log(w + (1−w)·e^(s−t)) as a logaddexp (≥ log w, where
    the log1p form would round 1 − (1−w) to 0 in fp32 for tiny w).
    """
    d = s - t
    d = torch.where(torch.isnan(d), torch.zeros_like(d), d).clamp_max(_MAX_LOG_RATIO)  # -inf - -inf
    x = (1.0 - w) * torch.expm1(d)
    log_w = torch.full_like(d, math.log(w) if w > 0 else -math.inf)
    log_m_over_p = torch.where(x > -0.5, torch.log1p(x.clamp_min(-0.5)), torch.logaddexp(log_w, math.log1p(-w) + d))
    summand = (1.0 - w) * (s.exp() - t.exp()) - _p_times(t, log_m_over_p)
    return summand.sum(-1).clamp_min(0.0)


def per_position_divergence(
    t: Tensor, s: Tensor, kind: str, *, beta: float = 0.5, alpha: float = 0.1
) -> Tensor:
    """Divergence ``kind`` between teacher log-probs ``t`` and student log-probs ``s``.

    ``t``, ``s``: (N, C) log-probabilities over the same C categories (``-inf`` allowed where a
    category has no mass). Returns (N,) fp32 values, ≥ 0 for every kind.
    """
    if kind == "forward_kl":
        return _kl(t, s)
    if kind == "reverse_kl":
        return _kl(s, t)
    if kind == "jsd":
        if beta <= _BETA_EPS:  # the end points, and β too small to represent in fp32 arithmetic
            return _kl(t, s)
        if beta >= 1.0 - _BETA_EPS:
            return _kl(s, t)
        # β KL(p‖m) / (β(1−β)) + (1−β) KL(q‖m) / (β(1−β)); m = β p + (1−β) q
        return _kl_to_mixture(t, s, beta) / (1.0 - beta) + _kl_to_mixture(s, t, 1.0 - beta) / beta
    if kind == "skew_forward_kl":
        return _kl_to_mixture(t, s, alpha)
    if kind == "skew_reverse_kl":
        return _kl_to_mixture(s, t, alpha)
    if kind == "tvd":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    if kind == "soft_ce":
        return -_p_times(t, s).sum(-1)
    raise ConfigError(f"unknown divergence kind {kind!r}; choose one of {', '.join(DIVERGENCES)}")


# --------------------------------------------------------------------------------------------
# Targets and their preparation for one block of valid rows.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseTargets:
    """Teacher top-k targets.

    ids: (*lead, k) int64 token ids; ``-1`` marks an unused slot.
    logprobs: (*lead, k) log p_T(id) at ``temperature``, normalised over the teacher's full
        vocabulary (so Σ_k exp ≤ 1).
    temperature: the temperature the log-probabilities were computed at; a loss at another
        temperature refuses them (the tail cannot be re-tempered).
    """

    ids: Tensor
    logprobs: Tensor
    temperature: float = 1.0

    def select(self, mask: Tensor | None, lead_ndim: int) -> SparseTargets:
        """Flatten leading dims and keep valid rows: (*lead, k) -> (N_valid, k)."""
        return SparseTargets(
            select_valid(self.ids, mask, lead_ndim),
            select_valid(self.logprobs, mask, lead_ndim),
            self.temperature,
        )

    def rows(self, start: int, stop: int) -> SparseTargets:
        """Rows ``start:stop`` of flattened (N, k) targets."""
        return SparseTargets(self.ids[start:stop], self.logprobs[start:stop], self.temperature)


@dataclass(frozen=True)
class DistributionSpec:
    """How one response loss compares distributions (everything but the tensors)."""

    kind: str = "forward_kl"
    temperature: float = 1.0
    scale_by_t2: bool = True
    beta: float = 0.5
    alpha: float = 0.1
    missing_mass: str = "tail"
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in DIVERGENCES:
            raise ConfigError(f"unknown divergence kind {self.kind!r}; choose one of {', '.join(DIVERGENCES)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"jsd beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"skew alpha must be in [0, 1), got {self.alpha}")
        if self.missing_mass not in ("tail", "renormalize", "ignore"):
            raise ConfigError(
                f"missing_mass must be 'tail', 'renormalize' or 'ignore', got {self.missing_mass!r}"
            )
        if self.missing_mass == "ignore" and self.kind != "soft_ce":
            raise ConfigError(f"missing_mass 'ignore' is only defined for soft_ce, not {self.kind}")

    @property
    def t2(self) -> float:
        return self.temperature**2 if self.scale_by_t2 else 1.0


def shared_vocab_size(student_vocab: int, teacher_vocab: int | None, vocab_size: int | None) -> int:
    """Number of leading logits both sides are compared over.

    Equal widths compare in full. Different widths (e.g. 152,064 vs 151,936: embedding matrices
    padded past the tokenizer) need ``vocab_size`` = the tokenizer's real size, which must fit in
    both; anything else is a true mismatch.
    """
    widths = [student_vocab] + ([teacher_vocab] if teacher_vocab is not None else [])
    if vocab_size is None:
        if teacher_vocab is not None and teacher_vocab != student_vocab:
            raise ShapeError(
                f"student has {student_vocab} logits but teacher has {teacher_vocab}; if both pad the "
                "same tokenizer, pass vocab_size = its real size"
            )
        return student_vocab
    if vocab_size > min(widths):
        raise ShapeError(
            f"vocab_size {vocab_size} exceeds the logits available (student {student_vocab}"
            + (f", teacher {teacher_vocab}" if teacher_vocab is not None else "")
            + "): student and teacher vocabularies do not match"
        )
    return vocab_size


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x ≤ 0, accurate over the whole range."""
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sparse_logprobs(
    student_logp: Tensor, targets: SparseTargets, missing_mass: str
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs over the sparse support (+ tail): (N, k) or (N, k + 1).

    ``student_logp``: (N, V) full-vocabulary student log-probs; ``targets``: (N, k) rows.
    """
    return support_logprobs(student_logp.gather(-1, targets.ids.clamp_min(0)), targets, missing_mass)


def support_logprobs(s_sel: Tensor, targets: SparseTargets, missing_mass: str) -> tuple[Tensor, Tensor]:
    """:func:`sparse_logprobs` from the student's log-probs already gathered at the target ids.

    ``s_sel``: (N, k) student log-probs at ``targets.ids`` (any value where an id is −1).
    """
    t_sel = targets.logprobs.float()
    unused = targets.ids < 0
    neg_inf = torch.full_like(s_sel, -math.inf)
    s_sel = torch.where(unused, neg_inf, s_sel)
    t_sel = torch.where(unused, neg_inf, t_sel)
    if missing_mass == "ignore":
        return t_sel, s_sel
    if missing_mass == "renormalize":
        return (
            t_sel - t_sel.logsumexp(-1, keepdim=True),
            s_sel - s_sel.logsumexp(-1, keepdim=True),
        )
    # Cap the support's mass at 1 − TAIL_FLOOR before log(1 − ·): the tail is then ≥ TAIL_FLOOR
    # with a finite gradient (clamping after the log would multiply a zero by an infinite one).
    cap = math.log1p(-TAIL_FLOOR)
    t_tail = _log1mexp(t_sel.logsumexp(-1, keepdim=True).clamp_max(cap))
    s_tail = _log1mexp(s_sel.logsumexp(-1, keepdim=True).clamp_max(cap))
    return torch.cat([t_sel, t_tail], -1), torch.cat([s_sel, s_tail], -1)


def check_sparse_ids(targets: SparseTargets, vocab: int) -> None:
    """Refuse target ids outside the compared vocabulary."""
    if targets.ids.numel() and int(targets.ids.max()) >= vocab:
        raise ShapeError(
            f"sparse target id {int(targets.ids.max())} is outside the compared vocabulary of {vocab}"
        )


def mixture_logits(logits: list[Tensor], weights: list[float], temperature: float) -> Tensor:
    """Logits of the weighted mixture of several teachers' distributions at ``temperature``.

    ``T · log Σ_i w_i softmax(z_i / T)`` (fp32; weights sum to 1): divided by T and
    log-softmaxed again it gives exactly ``log Σ_i w_i p_i``. One teacher's logits pass unchanged.
    """
    if len(logits) == 1:
        return logits[0]
    parts = [torch.log_softmax(z.float() / temperature, -1) + math.log(w) for z, w in zip(logits, weights)]
    return torch.stack(parts).logsumexp(0) * temperature


def _tempered(logits: Tensor, temperature: float) -> Tensor:
    """fp32 logits / T (no copy at T = 1 for fp32 input)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def block_loss_sum(
    student_logits: Tensor, teacher: Tensor | SparseTargets, spec: DistributionSpec, vocab: int
) -> Tensor:
    """Σ over rows of the divergence for one block of valid rows (no T², no normalisation).

    ``student_logits``: (N, ≥vocab); ``teacher``: (N, ≥vocab) logits or (N, k) sparse targets.
    """
    s = F.log_softmax(_tempered(student_logits[..., :vocab], spec.temperature), dim=-1)
    if isinstance(teacher, SparseTargets):
        t, s = sparse_logprobs(s, teacher, spec.missing_mass)
    else:
        t = F.log_softmax(_tempered(teacher[..., :vocab], spec.temperature), dim=-1)
    return per_position_divergence(t, s, spec.kind, beta=spec.beta, alpha=spec.alpha).sum()


def check_targets(
    teacher: Tensor | SparseTargets, lead_shape: torch.Size, spec: DistributionSpec, student_vocab: int
) -> int:
    """Validate targets against the student's leading shape; return the compared vocabulary size."""
    if isinstance(teacher, SparseTargets):
        if tuple(teacher.ids.shape[:-1]) != tuple(lead_shape) or teacher.ids.shape != teacher.logprobs.shape:
            raise ShapeError(
                f"sparse targets have ids {tuple(teacher.ids.shape)} and logprobs "
                f"{tuple(teacher.logprobs.shape)}; expected ({', '.join(map(str, lead_shape))}, k) for both"
            )
        if not math.isclose(teacher.temperature, spec.temperature):
            raise ConfigError(
                f"sparse targets were computed at temperature {teacher.temperature} but the loss uses "
                f"{spec.temperature}"
            )
        vocab = shared_vocab_size(student_vocab, None, spec.vocab_size)
        check_sparse_ids(teacher, vocab)
        return vocab
    if tuple(teacher.shape[:-1]) != tuple(lead_shape):
        raise ShapeError(
            f"teacher logits have shape {tuple(teacher.shape)}, student's leading shape is {tuple(lead_shape)}"
        )
    return shared_vocab_size(student_vocab, teacher.shape[-1], spec.vocab_size)


# --------------------------------------------------------------------------------------------
# Public loss on logits.
# --------------------------------------------------------------------------------------------


def distribution_loss(
    student_logits: Tensor,
    teacher: Tensor | SparseTargets,
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
) -> Tensor:
    """Response-based KD loss between student logits and teacher targets.

    student_logits: (*lead, V_S), any float dtype; *lead is (B, L) per token or (B,) per example.
    teacher: (*lead, V_T) logits, or :class:`SparseTargets` with (*lead, k) ids/logprobs.
    mask: (*lead) bool, True where the position counts (None: all). Build it from labels with
        :func:`kdistill.losses.reduce.mask_from_labels`.
    num_valid: divisor of the sum (default: the number of valid positions here).
    Returns a 0-dim fp32 tensor: ``T² · Σ_valid divergence / num_valid``.
    """
    spec = DistributionSpec(kind, temperature, scale_by_t2, beta, alpha, missing_mass, vocab_size)
    lead = student_logits.shape[:-1]
    mask = check_mask(mask, lead, "distribution_loss")
    vocab = check_targets(teacher, lead, spec, student_logits.shape[-1])
    s_rows = select_valid(student_logits, mask, len(lead))
    if isinstance(teacher, SparseTargets):
        t_rows: Tensor | SparseTargets = teacher.select(mask, len(lead))
    else:
        t_rows = select_valid(teacher, mask, len(lead))
    total = block_loss_sum(s_rows, t_rows, spec, vocab)
    return spec.t2 * normalise(total, num_valid, s_rows.shape[0])


FORMULAS: dict[str, str] = {
    "forward_kl": "T² · KL(p_T ‖ p_S) = T² Σ p_T (log p_T − log p_S)",
    "reverse_kl": "T² · KL(p_S ‖ p_T) = T² Σ p_S (log p_S − log p_T)",
    "jsd": "T² · [β KL(p_T‖m) + (1−β) KL(p_S‖m)] / (β(1−β)), m = β p_T + (1−β) p_S",
    "skew_forward_kl": "T² · KL(p_T ‖ α p_T + (1−α) p_S)",
    "skew_reverse_kl": "T² · KL(p_S ‖ α p_S + (1−α) p_T)",
    "tvd": "T² · ½ Σ |p_T − p_S|",
    "soft_ce": "T² · −Σ p_T log p_S",
}


def _register_divergences() -> None:
    for kind, formula in FORMULAS.items():

        def loss(student_logits: Tensor, teacher: Tensor | SparseTargets, mask: Tensor | None = None,
                 _kind: str = kind, **options: object) -> Tensor:
            return distribution_loss(student_logits, teacher, mask, kind=_kind, **options)  # type: ignore[arg-type]

        loss.__name__ = kind
        loss.__doc__ = f"{formula}; see :func:`distribution_loss` for arguments."
        register_loss(kind, family="response", formula=formula)(loss)


_register_divergences()
