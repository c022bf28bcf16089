"""The distiller: student forward, teacher targets, and the weighted objective for one micro-batch.

``loss = Σ_terms weight · term``, each term a registered loss (``kdistill losses``) or ``ce``
(hard-label cross-entropy), each normalised by the *global* count of its positions for the
optimizer step (``StepCounts``), so micro-batch losses add up to the loss of the whole step.

Positions per task (``TermSpec.positions``):
- classification: one per example;
- mlm: ``labels`` = the masked tokens, ``tokens`` = every non-padding token;
- causal: position i predicts token i + 1, so ``labels`` = positions whose next token has a label,
  ``tokens`` = positions whose next token is not padding. Causal response terms and ``ce`` go
  through the chunked loss on the final hidden states: no (B × L × V) logits tensor is built,
  and the terms over the same positions share one pass (e.g. KD + CE: the head's logits and
  GEMMs once, not once per term).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import ConfigError, KdistillError
from kdistill.losses import (
    ChunkedTerm,
    EnsembleHiddenTargets,
    HiddenTargets,
    SparseTargets,
    chunked_distribution_losses,
    distribution_loss,
    get_loss,
)
from kdistill.losses.feature import FeatureProjections, LayerPair, hidden_cosine, hidden_mse
from kdistill.losses.relation import attention_relation_kl, pooled_relation_loss
from kdistill.losses.response import DistributionSpec, mixture_logits
from kdistill.models.heads import lm_head_of
from kdistill.models.outputs import forward_outputs
from kdistill.recipe import TermSpec

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
POOLED_RELATIONS = ("rkd_distance", "rkd_angle", "similarity_preserving")


class TrainingError(KdistillError):
    """Training cannot go on (e.g. a non-finite loss)."""


@dataclass(frozen=True)
class StepCounts:
    """Valid positions of one optimizer step, summed over micro-batches and ranks, ÷ world size."""

    labels: float
    tokens: float
    examples: float


def position_masks(batch: dict[str, Tensor], task: str) -> dict[str, Tensor]:
    """Boolean masks of the positions each position kind covers (causal: shifted by one)."""
    attention = batch["attention_mask"].bool()
    masks = {"examples": torch.ones(attention.shape[0], dtype=torch.bool, device=attention.device)}
    if task == "causal":
        masks["labels"] = batch["labels"][:, 1:] != -100
        masks["tokens"] = attention[:, 1:]
    elif task == "mlm":
        masks["labels"] = batch["labels"] != -100
        masks["tokens"] = attention
    else:
        masks["labels"] = masks["examples"]
        masks["tokens"] = attention
    return masks


def batch_counts(batch: dict[str, Tensor], task: str) -> dict[str, int]:
    """Counts of valid positions per position kind in one micro-batch."""
    return {kind: int(mask.sum()) for kind, mask in position_masks(batch, task).items()}


def _family(kind: str) -> str:
    return "response" if kind == "ce" else get_loss(kind).family


def resolved_positions(term: TermSpec, task: str) -> str:
    """The term's position kind with ``default`` resolved."""
    if term.positions != "default":
        return term.positions
    if _family(term.kind) == "response":
        return "examples" if task == "classification" else "labels"
    return "tokens"


def hard_ce(task: str, model: nn.Module, outputs: dict, batch: dict[str, Tensor], mask: Tensor,
            count: float, vocab_size: int | None = None) -> Tensor:
    """Σ_valid −log q(label) / count: the task's own loss (soft labels where the batch has them).

    Causal LMs: through the chunked loss on the final hidden states (one-hot sparse targets,
    ``missing_mass="ignore"``), so the (B × L × V) logits are never built.
    """
    labels = batch["labels"]
    if task == "causal":
        total, _ = chunked_distribution_losses(outputs["final_hidden"][:, :-1], lm_head_of(model),
                                               [causal_ce_term(labels, count, vocab_size)], mask)
        return total
    logits = outputs["logits"]
    if task == "classification" and "soft_labels" in batch:
        log_probs = batch["soft_labels"].clamp_min(1e-12).log()
        return distribution_loss(logits, log_probs, mask, kind="soft_ce", num_valid=count)
    rows = logits[mask].float()
    return F.cross_entropy(rows, labels[mask], reduction="sum") / max(float(count), 1.0)


def causal_ce_term(labels: Tensor, count: float, vocab_size: int | None, weight: float = 1.0) -> ChunkedTerm:
    """Next-token cross-entropy as a chunked term: one-hot sparse targets (row j: token j + 1),
    ``soft_ce`` with ``missing_mass="ignore"`` = −log q(y)."""
    ids = labels[:, 1:, None].clamp_min(0)
    targets = SparseTargets(ids, torch.zeros(ids.shape, device=ids.device))
    return ChunkedTerm(targets, DistributionSpec("soft_ce", missing_mass="ignore", vocab_size=vocab_size), count, weight)


class StudentModule(nn.Module):
    """The student as one module for DDP: every forward (logits or final hidden states, hidden
    states, hooked outputs) goes through it, so gradients always pass through DDP's hooks."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.projections = nn.ModuleList()  # one FeatureProjections per teacher (see Distiller)

    def forward(self, inputs: dict[str, Tensor], hidden_states: bool, modules: list[str]) -> dict:
        return forward_outputs(self.model, self.task, inputs, hidden_states, modules)


def _state(outputs: dict, ref: int | str) -> Tensor:
    """A hidden state by index into ``hidden_states`` or a hooked module's output by path."""
    if isinstance(ref, int):
        states = outputs["hidden_states"]
        if not -len(states) <= ref < len(states):
            raise ConfigError(f"hidden state index {ref} out of range (the model has {len(states)} states)")
        return states[ref]
    return outputs["captured"][ref]


class Distiller:
    """Computes the objective for micro-batches.

    student: the (possibly DDP-wrapped) :class:`StudentModule`; teachers: None for plain
    fine-tuning (objective ``[ce]``); vocab_size: the tokenizer's size when teacher and student
    logits are padded to different widths.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers,  # LiveTeachers | CachedTeacher | None
        terms: list[TermSpec],
        task: str,
        vocab_size: int | None = None,
    ) -> None:
        self.student, self.teachers, self.terms, self.task = student, teachers, terms, task
        self.vocab_size = vocab_size
        self.labels = self._term_labels(terms)
        self.uses_teacher = any(t.kind != "ce" for t in terms)  # else the teacher only initialised the student
        refs = [ref for t in terms for pair in t.layers for ref in pair]
        self.need_hidden = any(isinstance(r, int) for r in refs) or any(
            t.kind in POOLED_RELATIONS and not t.layers for t in terms
        )
        self.student_modules = sorted({p[0] for t in terms for p in t.layers if isinstance(p[0], str)}
                                      | {p[0] for t in terms for p in t.modules})
        self.teacher_modules = sorted({p[1] for t in terms for p in t.layers if isinstance(p[1], str)}
                                      | {p[1] for t in terms for p in t.modules})
        for term in terms:
            if _family(term.kind) == "feature" and not term.layers:
                raise ConfigError(f"objective term {term.kind}: give layers: [[student, teacher], ...]")
            if term.kind == "attention_relation_kl" and not term.modules:
                raise ConfigError("objective term attention_relation_kl: give modules: [[student_path, teacher_path]]")

    @staticmethod
    def _term_labels(terms: list[TermSpec]) -> list[str]:
        labels, seen = [], {}
        for term in terms:
            seen[term.kind] = seen.get(term.kind, 0) + 1
            labels.append(term.kind if seen[term.kind] == 1 else f"{term.kind}#{seen[term.kind]}")
        return labels

    def build_projections(self, batch: dict[str, Tensor]) -> None:
        """Probe one batch for widths; give the student one :class:`FeatureProjections` per teacher.

        Call before wrapping the student for DDP (the projections train with it)."""
        feature_terms = [t for t in self.terms if _family(t.kind) == "feature"]
        module = self._student_module()
        module.projections = nn.ModuleList()
        if not feature_terms or self.teachers is None:
            return
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
        with torch.no_grad():
            s_out = module(inputs, self.need_hidden, self.student_modules)
            t_outs = self.teachers(inputs, self.need_hidden, self.teacher_modules, batch)
        for t_out in t_outs:
            specs = {}
            for term in feature_terms:
                for s_ref, t_ref in term.layers:
                    pair = LayerPair(s_ref, t_ref)
                    specs[pair.name] = (pair, _state(s_out, s_ref).shape[-1], _state(t_out, t_ref).shape[-1])
            module.projections.append(FeatureProjections(specs.values()))

    def __call__(self, batch: dict[str, Tensor], counts: StepCounts) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted loss of one micro-batch and each term's unweighted value (both 0-dim)."""
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
        s_out = self.student(inputs, self.need_hidden, self.student_modules)
        t_outs = (self.teachers(inputs, self.need_hidden, self.teacher_modules, batch)
                  if self.teachers is not None and self.uses_teacher else [])
        masks = position_masks(batch, self.task)
        total = torch.zeros((), device=batch["input_ids"].device)
        values: dict[str, Tensor] = {}
        chunked: dict[str, list[tuple[str, ChunkedTerm]]] = {}  # causal response terms by position kind
        for label, term in zip(self.labels, self.terms):
            positions = resolved_positions(term, self.task)
            count = getattr(counts, positions)
            if self.task == "causal" and _family(term.kind) == "response":
                chunked.setdefault(positions, []).append((label, self._chunked_term(term, batch, t_outs, count)))
                continue
            value = self._term(term, batch, s_out, t_outs, masks[positions], count)
            values[label] = value
            total = total + term.weight * value
        for positions, group in chunked.items():  # one pass over the vocabulary per position kind
            fused, parts = chunked_distribution_losses(s_out["final_hidden"][:, :-1],
                                                       lm_head_of(self._student_model()),
                                                       [t for _, t in group], masks[positions])
            total = total + fused
            values.update({label: value for (label, _), value in zip(group, parts)})
        return total, {label: values[label] for label in self.labels}

    # ------------------------------------------------------------------ terms

    def _term(self, term, batch, s_out, t_outs, mask, count) -> Tensor:
        family = _family(term.kind)
        if term.kind == "ce":
            return self._hard_ce(batch, s_out, mask, count)
        if family == "response":
            return self._response(term, s_out, t_outs, mask, count)
        weights = self.teachers.weights
        if family == "feature":
            fn = hidden_mse if term.kind == "hidden_mse" else hidden_cosine
            token_mask = batch["attention_mask"].bool()
            total = 0.0
            for i, (t_out, w) in enumerate(zip(t_outs, weights)):
                for s_ref, t_ref in term.layers:
                    pair = LayerPair(s_ref, t_ref)
                    proj = self._student_module().projections[i]
                    total = total + w * fn(_state(s_out, s_ref), _state(t_out, t_ref), token_mask,
                                           projection=lambda rows, p=pair, m=proj: m(p, rows), num_valid=count)
            return total / len(term.layers)
        if term.kind == "attention_relation_kl":
            token_mask = batch["attention_mask"].bool()
            total = 0.0
            for t_out, w in zip(t_outs, weights):
                for s_path, t_path in term.modules:
                    total = total + w * attention_relation_kl(
                        s_out["captured"][s_path], t_out["captured"][t_path], token_mask,
                        num_relation_heads=term.num_relation_heads, num_valid=count)
            return total / len(term.modules)
        # pooled sample–sample relations: a batch-level mean, weighted by this micro-batch's share
        pairs = term.layers or [(-1, -1)]
        share = batch["input_ids"].shape[0] / max(count, 1)
        total = 0.0
        for t_out, w in zip(t_outs, weights):
            for s_ref, t_ref in pairs:
                total = total + w * pooled_relation_loss(_state(s_out, s_ref), _state(t_out, t_ref),
                                                         batch["attention_mask"].bool(), kind=term.kind)
        return share * total / len(pairs)

    def _hard_ce(self, batch, s_out, mask, count) -> Tensor:
        return hard_ce(self.task, self._student_model(), s_out, batch, mask, count, self.vocab_size)

    def _chunked_term(self, term, batch, t_outs, count) -> ChunkedTerm:
        """A causal response term (or ``ce``) for the fused chunked pass over the student's head."""
        if term.kind == "ce":
            return causal_ce_term(batch["labels"], count, self.vocab_size, term.weight)
        sparse = t_outs[0].get("sparse")
        spec = DistributionSpec(term.kind, term.temperature, term.scale_by_t2, term.beta, term.alpha,
                                term.missing_mass if sparse is not None else "tail", self.vocab_size)
        if sparse is not None:  # cached top-k targets: row j is the distribution of token j + 1
            targets = SparseTargets(sparse.ids[:, :-1], sparse.logprobs[:, :-1], sparse.temperature)
        else:
            members = tuple(HiddenTargets(t["final_hidden"][:, :-1], lm_head_of(m))
                            for t, m in zip(t_outs, self.teachers.models))
            targets = members[0] if len(members) == 1 else EnsembleHiddenTargets(members, tuple(self.teachers.weights))
        return ChunkedTerm(targets, spec, count, term.weight)

    def _response(self, term, s_out, t_outs, mask, count) -> Tensor:
        """A response term of a classification or masked-LM student, on its logits."""
        options = dict(kind=term.kind, temperature=term.temperature, scale_by_t2=term.scale_by_t2,
                       beta=term.beta, alpha=term.alpha, num_valid=count, vocab_size=self.vocab_size)
        weights = self.teachers.weights
        teacher_logits = mixture_logits([t["logits"] for t in t_outs], weights, term.temperature)
        logits = s_out["logits"]
        return distribution_loss(logits, teacher_logits, mask, **options)

    def _student_module(self) -> StudentModule:
        return getattr(self.student, "module", self.student)  # unwrap DDP

    def _student_model(self) -> nn.Module:
        return self._student_module().model

