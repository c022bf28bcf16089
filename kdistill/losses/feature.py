"""Feature-based KD: match the student's intermediate hidden states to the teacher's.

Per valid position, with student row ``s`` (projected to the teacher's width when the widths
differ) and teacher row ``t``, both of width H:

| loss            | per-position value                                        |
|-----------------|-----------------------------------------------------------|
| ``hidden_mse``  | (1/H) Σ_h (s_h − t_h)²                                     |
| ``hidden_cosine`` | 1 − s·t / (max(‖s‖, ε) · max(‖t‖, ε))  (DistilBERT, target 1) |

Reduction (see :mod:`kdistill.losses.reduce`): ``Σ_valid value / num_valid``. The teacher is
detached; all maths runs in fp32 whatever the input dtype.

Width mismatches are bridged by :class:`FeatureProjections`: one trainable
``nn.Linear(H_S, H_T)`` per layer pair whose widths differ (FitNets' regressor). It is trained
and checkpointed with the distillation state but is never part of the exported student.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from kdistill.errors import ConfigError, ShapeError
from kdistill.losses.reduce import check_mask, normalise, select_valid
from kdistill.losses.registry import register_loss

COSINE_EPS = 1e-8

Projection = Callable[[Tensor], Tensor]


def _key_part(ref: int | str) -> str:
    """``3`` -> ``h3`` (hidden_states index), ``"encoder.layer.3"`` -> ``m_encoder_layer_3``."""
    if isinstance(ref, bool) or not isinstance(ref, (int, str)):
        raise ConfigError(f"layer reference must be an int index or a module path, got {ref!r}")
    if isinstance(ref, int):
        return f"h{ref}"
    return "m_" + ref.replace(".", "_")


@dataclass(frozen=True)
class LayerPair:
    """A student layer matched to a teacher layer.

    student, teacher: an index into the model's ``hidden_states`` tuple (int), or a module path
    such as ``"encoder.layer.3"`` (str).
    """

    student: int | str
    teacher: int | str

    def __post_init__(self) -> None:
        _key_part(self.student)
        _key_part(self.teacher)

    @property
    def name(self) -> str:
        """A key usable in ``nn.ModuleDict`` (no dots), e.g. ``s_h3__t_m_encoder_layer_6``."""
        return f"s_{_key_part(self.student)}__t_{_key_part(self.teacher)}"


class FeatureProjections(nn.Module):
    """Student-to-teacher width projections, one per layer pair.

    Built from ``(pair, student_width, teacher_width)`` triples: an ``nn.Linear(H_S, H_T)`` where
    the widths differ, the identity (no parameters) where they are equal. Initialisation follows
    the global RNG, so seed before constructing for a reproducible run.
    """

    def __init__(self, specs: Iterable[tuple[LayerPair, int, int]]) -> None:
        super().__init__()
        self.proj = nn.ModuleDict()
        self._widths: dict[str, tuple[int, int]] = {}
        self._pairs: dict[str, LayerPair] = {}
        for pair, student_width, teacher_width in specs:
            if not isinstance(pair, LayerPair):
                raise ConfigError(f"FeatureProjections: expected a LayerPair, got {pair!r}")
            if student_width < 1 or teacher_width < 1:
                raise ConfigError(
                    f"FeatureProjections: widths of {pair} must be ≥ 1, got {student_width} and {teacher_width}"
                )
            name = pair.name
            if name in self._pairs:
                raise ConfigError(
                    f"FeatureProjections: {pair} and {self._pairs[name]} share the key {name!r}; list each pair once"
                )
            self._pairs[name] = pair
            self._widths[name] = (int(student_width), int(teacher_width))
            if student_width != teacher_width:
                self.proj[name] = nn.Linear(student_width, teacher_width)

    @property
    def pairs(self) -> list[LayerPair]:
        """The layer pairs, in construction order."""
        return list(self._pairs.values())

    def is_identity(self, pair: LayerPair) -> bool:
        """True where the pair's widths are equal (no projection)."""
        return self._lookup(pair) not in self.proj

    def _lookup(self, pair: LayerPair) -> str:
        name = pair.name
        if name not in self._widths:
            raise ConfigError(f"FeatureProjections: unknown layer pair {pair}; known: {self.pairs}")
        return name

    def forward(self, pair: LayerPair, student_hidden: Tensor) -> Tensor:
        """Project ``student_hidden`` (*lead, H_S) to (*lead, H_T) for ``pair``."""
        name = self._lookup(pair)
        student_width = self._widths[name][0]
        if student_hidden.shape[-1] != student_width:
            raise ShapeError(
                f"FeatureProjections: student hidden width {student_hidden.shape[-1]} for {pair}, "
                f"expected {student_width}"
            )
        if name not in self.proj:
            return student_hidden
        layer = self.proj[name]
        return layer(student_hidden.to(layer.weight.dtype))


def _valid_rows(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor | None,
    projection: Projection | None,
    what: str,
) -> tuple[Tensor, Tensor]:
    """Valid fp32 rows (N, H) of the (projected) student and the detached teacher."""
    lead = student_hidden.shape[:-1]
    if tuple(teacher_hidden.shape[:-1]) != tuple(lead):
        raise ShapeError(
            f"{what}: teacher_hidden has shape {tuple(teacher_hidden.shape)}, student_hidden "
            f"{tuple(student_hidden.shape)}; leading dims must match"
        )
    mask = check_mask(mask, lead, what)
    s = select_valid(student_hidden, mask, len(lead)).float()
    t = select_valid(teacher_hidden.detach(), mask, len(lead)).float()
    if projection is not None:
        s = projection(s).float()
        if s.shape[-1] != t.shape[-1]:
            raise ShapeError(
                f"{what}: projected student width {s.shape[-1]} != teacher width {t.shape[-1]}"
            )
    elif s.shape[-1] != t.shape[-1]:
        raise ShapeError(
            f"{what}: student width {s.shape[-1]} != teacher width {t.shape[-1]}; pass projection= "
            "(see FeatureProjections)"
        )
    return s, t


@register_loss("hidden_mse", family="feature", formula="Σ_valid (1/H_T) ‖proj(h_S) − h_T‖² / n_valid")
def hidden_mse(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor | None = None,
    *,
    projection: Projection | None = None,
    num_valid: Tensor | float | None = None,
) -> Tensor:
    """Mean-squared error between hidden states, per position averaged over hidden dims.

    student_hidden: (*lead, H_S); teacher_hidden: (*lead, H_T); mask: (*lead) bool or None.
    projection: maps student rows (N, H_S) -> (N, H_T), required when H_S != H_T.
    Returns a 0-dim fp32 tensor: ``Σ_valid (1/H_T) ‖proj(s) − t‖² / num_valid``.
    """
    s, t = _valid_rows(student_hidden, teacher_hidden, mask, projection, "hidden_mse")
    total = (s - t).square().mean(-1).sum()
    return normalise(total, num_valid, s.shape[0])


@register_loss("hidden_cosine", family="feature", formula="Σ_valid (1 − cos(proj(h_S), h_T)) / n_valid")
def hidden_cosine(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor | None = None,
    *,
    projection: Projection | None = None,
    num_valid: Tensor | float | None = None,
) -> Tensor:
    """Cosine embedding loss (target 1) between hidden states: per position 1 − cos(s, t).

    Shapes and arguments as :func:`hidden_mse`. Norms are clamped at ``COSINE_EPS`` (as
    ``sqrt(max(‖x‖², ε²))``), so zero vectors give cos = 0 and finite gradients.
    Returns a 0-dim fp32 tensor: ``Σ_valid (1 − cos(proj(s), t)) / num_valid``.
    """
    s, t = _valid_rows(student_hidden, teacher_hidden, mask, projection, "hidden_cosine")
    eps2 = COSINE_EPS**2
    s_norm = s.square().sum(-1).clamp_min(eps2).sqrt()
    t_norm = t.square().sum(-1).clamp_min(eps2).sqrt()
    cos = ((s * t).sum(-1) / (s_norm * t_norm)).clamp(-1.0, 1.0)  # rounding can exceed ±1
    total = (1.0 - cos).sum()
    return normalise(total, num_valid, s.shape[0])
