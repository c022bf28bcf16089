"""Relation-based KD: match how representations relate to each other, not the representations.

Sample–sample relations, on pooled states P_S (b, H_S) and P_T (b, H_T) of the b valid samples
(widths may differ: only relations are compared):

| loss                    | relation and loss                                                        |
|-------------------------|--------------------------------------------------------------------------|
| ``rkd_distance``        | d_ij = ‖p_i − p_j‖ / μ (μ: mean over pairs i<j); mean_ij smoothL1(d_S, d_T) |
| ``rkd_angle``           | a_ijk = ⟨e_ji, e_jk⟩, e_ji = (p_i − p_j)/‖p_i − p_j‖; mean smoothL1(a_S, a_T) |
| ``similarity_preserving`` | G = P Pᵀ, rows L2-normalised; ‖G_S − G_T‖_F² / b²                      |

(Park et al., 2019, "Relational Knowledge Distillation"; Tung & Mori, 2019, "Similarity-Preserving
Knowledge Distillation"). Angles are taken over distinct triplets: anchor j, unordered {i, k}, all
three different. Norms are ``sqrt(max(‖x‖², ε))``, so coincident samples give finite gradients.
With fewer than 2 valid samples (3 for angles) these losses are 0, still connected to the graph.

Token–token relations (MiniLMv2, Wang et al., 2021): :func:`attention_relation_kl` compares the
self-attention relations of query, key or value vectors, split into R relation heads so that
teacher and student may have different widths and head counts.

Teachers are detached; all maths runs in fp32 whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import ConfigError, ShapeError
from kdistill.losses.reduce import check_mask, normalise, select_valid
from kdistill.losses.registry import register_loss
from kdistill.losses.response import per_position_divergence

RELATION_EPS = 1e-12  # floor of squared norms and distances
RelationKind = Literal["rkd_distance", "rkd_angle", "similarity_preserving"]


# --------------------------------------------------------------------------------------------
# Pooling and sample selection.
# --------------------------------------------------------------------------------------------


def masked_mean_pool(hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of the valid tokens of each sample: (B, L, H), mask (B, L) bool -> (B, H) fp32.

    Padding never contributes (not even NaN/inf garbage); fully masked samples give zeros.
    """
    if hidden.dim() != 3:
        raise ShapeError(f"masked_mean_pool: hidden must be (B, L, H), got shape {tuple(hidden.shape)}")
    hidden = hidden.float()
    if mask is None:
        return hidden.mean(1)
    mask = check_mask(mask, hidden.shape[:2], "masked_mean_pool")
    total = torch.where(mask[..., None], hidden, torch.zeros((), device=hidden.device)).sum(1)
    return total / mask.sum(1, keepdim=True).clamp_min(1).float()


def _valid_samples(
    student: Tensor, teacher: Tensor, sample_mask: Tensor | None, what: str
) -> tuple[Tensor, Tensor]:
    """fp32 rows (b, H) of the valid samples; the teacher detached."""
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ShapeError(
            f"{what}: student and teacher must be (B, H_S) and (B, H_T), got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    sample_mask = check_mask(sample_mask, student.shape[:1], what)
    return (
        select_valid(student, sample_mask, 1).float(),
        select_valid(teacher.detach(), sample_mask, 1).float(),
    )


def _zero(x: Tensor) -> Tensor:
    """0 connected to the graph of ``x`` (finite rows only)."""
    return x.sum() * 0.0


# --------------------------------------------------------------------------------------------
# Sample–sample relations.
# --------------------------------------------------------------------------------------------


def _pair_distances(x: Tensor) -> Tensor:
    """Euclidean distances of the pairs i<j of rows of ``x`` (b, H), via the Gram matrix: (b(b−1)/2,).

    Rows are centred first (distances are translation invariant), which keeps the Gram
    expansion ‖x_i‖² + ‖x_j‖² − 2 x_i·x_j free of cancellation from a shared offset.
    """
    x = x - x.mean(0, keepdim=True)
    gram = x @ x.T
    sq_norm = gram.diagonal()
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    sq = sq_norm[i] + sq_norm[j] - 2.0 * gram[i, j]
    return sq.clamp_min(RELATION_EPS).sqrt()


@register_loss("rkd_distance", family="relation", formula="mean_{i<j} smoothL1(d_S,ij, d_T,ij), d_ij = ‖p_i − p_j‖ / mean d")
def rkd_distance(student: Tensor, teacher: Tensor, sample_mask: Tensor | None = None) -> Tensor:
    """RKD distance loss between pooled states.

    student: (B, H_S); teacher: (B, H_T); sample_mask: (B,) bool or None (all valid).
    Returns a 0-dim fp32 tensor: mean over valid pairs i<j of smoothL1(d_S/μ_S, d_T/μ_T) (β = 1).
    """
    s, t = _valid_samples(student, teacher, sample_mask, "rkd_distance")
    if s.shape[0] < 2:
        return _zero(s)
    d_s = _pair_distances(s)
    d_t = _pair_distances(t)
    return F.smooth_l1_loss(d_s / d_s.mean(), d_t / d_t.mean(), reduction="mean")


def _triplet_angles(x: Tensor) -> Tensor:
    """cos ∠(x_i, x_j, x_k) = ⟨e_ji, e_jk⟩ for anchors j and pairs i<k, all distinct: (b(b−1)(b−2)/2,).

    Memory: one (b, b, H) tensor of difference vectors.
    """
    b = x.shape[0]
    diff = x[None, :, :] - x[:, None, :]  # diff[j, i] = x_i − x_j
    unit = diff / diff.square().sum(-1, keepdim=True).clamp_min(RELATION_EPS).sqrt()
    angles = unit @ unit.transpose(1, 2)  # angles[j, i, k] = ⟨e_ji, e_jk⟩
    idx = torch.arange(b, device=x.device)
    j, i, k = idx[:, None, None], idx[None, :, None], idx[None, None, :]
    keep = (i != j) & (k != j) & (i < k)
    return angles[keep]


@register_loss("rkd_angle", family="relation", formula="mean_{ijk} smoothL1(cos∠_S(i,j,k), cos∠_T(i,j,k))")
def rkd_angle(student: Tensor, teacher: Tensor, sample_mask: Tensor | None = None) -> Tensor:
    """RKD angle loss between pooled states.

    student: (B, H_S); teacher: (B, H_T); sample_mask: (B,) bool or None (all valid).
    Returns a 0-dim fp32 tensor: mean over distinct triplets of smoothL1(a_S, a_T) (β = 1).
    """
    s, t = _valid_samples(student, teacher, sample_mask, "rkd_angle")
    if s.shape[0] < 3:
        return _zero(s)
    return F.smooth_l1_loss(_triplet_angles(s), _triplet_angles(t), reduction="mean")


def _normalised_gram(x: Tensor) -> Tensor:
    """G = x xᵀ with each row divided by its L2 norm: (b, H) -> (b, b)."""
    gram = x @ x.T
    return gram / gram.square().sum(-1, keepdim=True).clamp_min(RELATION_EPS).sqrt()


@register_loss("similarity_preserving", family="relation", formula="‖norm_rows(P_S P_Sᵀ) − norm_rows(P_T P_Tᵀ)‖²_F / b²")
def similarity_preserving(student: Tensor, teacher: Tensor, sample_mask: Tensor | None = None) -> Tensor:
    """Similarity-preserving loss between pooled states.

    student: (B, H_S); teacher: (B, H_T); sample_mask: (B,) bool or None (all valid).
    Returns a 0-dim fp32 tensor: ‖G_S − G_T‖_F² / b², b = number of valid samples.
    """
    s, t = _valid_samples(student, teacher, sample_mask, "similarity_preserving")
    b = s.shape[0]
    if b < 2:
        return _zero(s)
    return (_normalised_gram(s) - _normalised_gram(t)).square().sum() / (b * b)


_SAMPLE_LOSSES = {
    "rkd_distance": rkd_distance,
    "rkd_angle": rkd_angle,
    "similarity_preserving": similarity_preserving,
}


def pooled_relation_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor | None = None,
    *,
    kind: str = "rkd_distance",
) -> Tensor:
    """Sample–sample relation loss ``kind`` on mean-pooled token states.

    student_hidden: (B, L, H_S); teacher_hidden: (B, L, H_T); mask: (B, L) bool or None.
    Samples whose tokens are all masked are left out. Returns a 0-dim fp32 tensor.
    """
    if kind not in _SAMPLE_LOSSES:
        raise ConfigError(f"unknown relation kind {kind!r}; choose one of {', '.join(_SAMPLE_LOSSES)}")
    if tuple(student_hidden.shape[:-1]) != tuple(teacher_hidden.shape[:-1]):
        raise ShapeError(
            f"pooled_relation_loss: student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
            f"{tuple(teacher_hidden.shape)} must share (B, L)"
        )
    sample_mask = None if mask is None else check_mask(mask, student_hidden.shape[:2], kind).any(-1)
    return _SAMPLE_LOSSES[kind](
        masked_mean_pool(student_hidden, mask), masked_mean_pool(teacher_hidden.detach(), mask), sample_mask
    )


# --------------------------------------------------------------------------------------------
# Token–token relations (MiniLM).
# --------------------------------------------------------------------------------------------


def _relation_logprobs(x: Tensor, mask: Tensor | None, heads: int) -> Tensor:
    """Log-softmax relations of the valid query rows: (B, L, D) -> (N_valid · R, L) fp32.

    rel_h = softmax(x_h x_hᵀ / √d_r) over keys, d_r = D / R, padded keys at −inf.
    """
    bsz, length, width = x.shape
    d_r = width // heads
    x = x.float()
    if mask is not None:  # zero the padding first: garbage there must not reach any gradient
        x = torch.where(mask[..., None], x, torch.zeros((), device=x.device))
    xh = x.reshape(bsz, length, heads, d_r).transpose(1, 2)  # (B, R, L, d_r)
    scores = (xh @ xh.transpose(-1, -2)) / math.sqrt(d_r)  # (B, R, L_query, L_key)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], -math.inf)
    rows = select_valid(scores.transpose(1, 2), mask, 2)  # (N, R, L_key): valid queries only
    return F.log_softmax(rows, dim=-1).reshape(-1, length)


@register_loss("attention_relation_kl", family="relation", formula="Σ_{valid rows, heads} KL(softmax(x_T x_Tᵀ/√d_T) ‖ softmax(x_S x_Sᵀ/√d_S)) / (n_valid · R)")
def attention_relation_kl(
    student_x: Tensor,
    teacher_x: Tensor,
    mask: Tensor | None = None,
    *,
    num_relation_heads: int,
    num_valid: Tensor | float | None = None,
) -> Tensor:
    """MiniLM(v2) self-attention relation loss: KL(rel_T ‖ rel_S) per valid query row and head.

    student_x: (B, L, D_S) and teacher_x: (B, L, D_T), the query, key or value vectors of one
    layer; mask: (B, L) bool or None. Each side is split into R = ``num_relation_heads`` heads
    of width D/R (D_S and D_T must both be divisible by R); padded keys get no attention.
    num_valid: the number of valid query positions (tokens) to divide by, e.g. the global count
    across accumulation steps (default: the valid positions here).
    Returns a 0-dim fp32 tensor: ``Σ_{valid rows, heads} KL / (num_valid · R)``.
    """
    if not isinstance(num_relation_heads, int) or isinstance(num_relation_heads, bool) or num_relation_heads < 1:
        raise ConfigError(f"num_relation_heads must be a positive int, got {num_relation_heads!r}")
    if student_x.dim() != 3 or teacher_x.dim() != 3 or student_x.shape[:2] != teacher_x.shape[:2]:
        raise ShapeError(
            f"attention_relation_kl: student_x and teacher_x must be (B, L, D) with the same B, L, got "
            f"{tuple(student_x.shape)} and {tuple(teacher_x.shape)}"
        )
    heads = num_relation_heads
    for side, x in (("student", student_x), ("teacher", teacher_x)):
        if x.shape[-1] % heads:
            raise ShapeError(
                f"attention_relation_kl: {side} width {x.shape[-1]} is not divisible by "
                f"num_relation_heads={heads}"
            )
    mask = check_mask(mask, student_x.shape[:2], "attention_relation_kl")
    s = _relation_logprobs(student_x, mask, heads)
    t = _relation_logprobs(teacher_x.detach(), mask, heads)
    total = per_position_divergence(t, s, "forward_kl").sum()
    return normalise(total, num_valid, s.shape[0] // heads) / heads
