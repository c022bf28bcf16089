"""Quality of teacher and student on held-out data, by task, and how closely the student follows.

Classification: accuracy, macro-F1, expected calibration error (ECE) with reliability-diagram
bins; student vs teacher: forward KL per example and prediction agreement.
Language models (causal, masked): token-weighted perplexity ``exp(Σ NLL / Σ tokens)`` over the
label positions (causal: every next token, instruction data: the response tokens only; masked:
the masked tokens, the same seeded masks for both models); student vs teacher: forward
``KL(p_T ‖ p_S)`` per token, mean over valid tokens, and top-1 agreement (fraction of valid
positions where the argmaxes agree). Instruction data: ROUGE-L F of greedy generations vs the
reference outputs.

Comparability: classification needs the same label count (and the same label names when both
models name them); language models need the same tokenizer vocabulary, or a student with a
trimmed vocabulary whose directory holds ``kdistill_vocab.json`` (``{"new_to_old": [...]}``,
student id → teacher id). With a trimmed student, texts are tokenized by the teacher's tokenizer
and mapped to student ids; positions whose target the student lacks are left out of every number
(counted as ``untranslatable_tokens``), and KL is computed over the student's ids plus one tail
bucket holding the teacher's mass on the dropped ids
(:class:`~kdistill.losses.SparseTargets`, ``missing_mass="tail"``, floored at 1e-6).
Otherwise :class:`~kdistill.errors.ConfigError` ``teacher and student are not comparable on
<metric>: <why>``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import ConfigError, DataError
from kdistill.losses import SparseTargets, distribution_loss
from kdistill.losses.reduce import IGNORE_INDEX

log = logging.getLogger(__name__)

VOCAB_MAP_FILE = "kdistill_vocab.json"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ECE_BINS = 15


# ---------------------------------------------------------------------------- classification metrics


def accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Fraction of examples with ``prediction == label``."""
    return float((predictions == labels).float().mean()) if labels.numel() else float("nan")


def macro_f1(predictions: Tensor, labels: Tensor, num_classes: int | None = None) -> float:
    """Unweighted mean over classes of ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``.

    Classes averaged: those present in ``labels`` or ``predictions`` (as scikit-learn's default);
    ``num_classes`` (if given) averages over all of ``0..C−1`` instead, an absent class scoring 0.
    """
    if not labels.numel():
        return float("nan")
    classes = range(num_classes) if num_classes is not None else sorted(
        set(labels.tolist()) | set(predictions.tolist()))
    scores = []
    for c in classes:
        tp = int(((predictions == c) & (labels == c)).sum())
        fp = int(((predictions == c) & (labels != c)).sum())
        fn = int(((predictions != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


def calibration(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> dict:
    """Expected calibration error and reliability-diagram data.

    ``probs``: (N, C) class probabilities; confidence = max_c p, prediction = argmax. Bins are
    equal-width on [0, 1]: bin b holds (b/B, (b+1)/B] (the first also holds 0).
    ``ECE = Σ_b |B_b|/n · |acc_b − conf_b|`` with acc_b, conf_b the bin's accuracy and mean
    confidence. Returns ``{"ece", "bins": [{"lower", "upper", "count", "accuracy", "confidence"}]}``
    (accuracy/confidence None for empty bins).
    """
    confidence, predictions = probs.double().max(-1)
    correct = (predictions == labels).double()
    n = labels.numel()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        acc = float(correct[inside].mean()) if count else None
        conf = float(confidence[inside].mean()) if count else None
        if count:
            ece += count / n * abs(acc - conf)
        table.append({"lower": b / bins, "upper": (b + 1) / bins, "count": count, "accuracy": acc,
                      "confidence": conf})
    return {"ece": ece if n else float("nan"), "bins": table}


def classification_metrics(logits: Tensor, labels: Tensor, bins: int = ECE_BINS) -> dict:
    """Accuracy, macro-F1 (classes seen in labels or predictions), ECE and reliability bins from (N, C) logits."""
    probs = logits.float().softmax(-1)
    predictions = probs.argmax(-1)
    cal = calibration(probs, labels, bins)
    return {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels),
            "ece": cal["ece"], "reliability": cal["bins"], "examples": int(labels.numel())}


# ---------------------------------------------------------------------------- comparability


def not_comparable(metric: str, why: str) -> ConfigError:
    return ConfigError(f"teacher and student are not comparable on {metric}: {why}")


def check_classifiers(teacher: nn.Module, student: nn.Module) -> None:
    """Same label count, and the same label names where both models name their labels."""
    nt, ns = teacher.config.num_labels, student.config.num_labels
    if nt != ns:
        raise not_comparable("accuracy", f"the teacher has {nt} labels, the student {ns}")
    names_t, names_s = label_names(teacher), label_names(student)
    if names_t is not None and names_s is not None and names_t != names_s:
        raise not_comparable("accuracy", f"the teacher's labels {names_t} differ from the student's {names_s}")


def label_names(model: nn.Module) -> list[str] | None:
    id2label = getattr(model.config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(model.config.num_labels)]
    return None if all(re.fullmatch(r"LABEL_\d+", n) for n in names) else names


@dataclass(frozen=True)
class VocabMap:
    """Student ids of a trimmed vocabulary in the teacher's id space.

    new_to_old: (V_S,) teacher id of each student id; old_to_new: (V_T,) student id or −1.
    """

    new_to_old: Tensor
    old_to_new: Tensor

    @classmethod
    def from_new_to_old(cls, new_to_old: Sequence[int], teacher_size: int) -> VocabMap:
        n2o = torch.as_tensor(list(new_to_old), dtype=torch.long)
        if n2o.numel() == 0 or int(n2o.min()) < 0 or int(n2o.max()) >= teacher_size:
            raise not_comparable("perplexity", f"{VOCAB_MAP_FILE} maps to ids outside the teacher's "
                                               f"vocabulary of {teacher_size}")
        if n2o.unique().numel() != n2o.numel():
            raise not_comparable("perplexity", f"{VOCAB_MAP_FILE} maps two student ids to one teacher id")
        o2n = torch.full((teacher_size,), -1, dtype=torch.long)
        o2n[n2o] = torch.arange(n2o.numel())
        return cls(n2o, o2n)

    def to_student(self, teacher_ids: Tensor) -> Tensor:
        """Teacher ids → student ids (−1 where dropped; IGNORE_INDEX and other negatives stay −1)."""
        return torch.where(teacher_ids >= 0, self.old_to_new.to(teacher_ids.device)[teacher_ids.clamp_min(0)],
                           torch.full_like(teacher_ids, -1))


def load_vocab_map(student_dir: str | Path | None, teacher_size: int) -> VocabMap | None:
    """The :class:`VocabMap` of ``student_dir/kdistill_vocab.json``, or None when there is none."""
    if student_dir is None:
        return None
    path = Path(student_dir) / VOCAB_MAP_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        new_to_old = data["new_to_old"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: expected JSON with a 'new_to_old' list of ids ({exc})") from None
    return VocabMap.from_new_to_old(new_to_old, teacher_size)


def lm_comparison(teacher_tokenizer, student_tokenizer, student_dir: str | Path | None,
                  teacher_width: int, student_width: int) -> tuple[VocabMap | None, int | None]:
    """How to compare two LMs: ``(vocab_map, vocab_size)``.

    Same vocabulary: ``(None, vocab_size)`` with ``vocab_size`` the tokenizer size when the two
    output widths differ (embedding rows padded past the tokenizer), else None. A trimmed student:
    ``(VocabMap, None)``. Else :class:`ConfigError`.
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab == s_vocab:
        if teacher_width == student_width:
            return None, None
        size = len(teacher_tokenizer)
        if size > min(teacher_width, student_width):
            raise not_comparable("KL", f"output widths {teacher_width} and {student_width} do not hold the "
                                       f"tokenizer's {size} tokens")
        return None, size
    vocab_map = load_vocab_map(student_dir, teacher_width)
    if vocab_map is None:
        raise not_comparable("perplexity, KL and agreement",
                             f"their tokenizers differ ({len(teacher_tokenizer)} vs {len(student_tokenizer)} "
                             f"tokens) and the student has no {VOCAB_MAP_FILE}")
    if vocab_map.new_to_old.numel() > student_width:
        raise not_comparable("KL", f"{VOCAB_MAP_FILE} has {vocab_map.new_to_old.numel()} ids, the student "
                                   f"only {student_width} outputs")
    return vocab_map, None


# ---------------------------------------------------------------------------- running the models


def _batches(examples: list[dict], collator: Callable, batch_size: int, seed: int, device: str):
    for start in range(0, len(examples), batch_size):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)  # MLM masks: same for both models
        batch = collator(examples[start:start + batch_size], generator=generator)
        yield {k: v.to(device) for k, v in batch.items()}


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


@torch.no_grad()
def classification_quality(teacher: nn.Module, student: nn.Module,
                           encoded: dict[str, tuple[list[dict], Callable]], *, batch_size: int = 32,
                           device: str = "cpu", bins: int = ECE_BINS) -> dict:
    """Per model: :func:`classification_metrics`; ``vs_teacher``: mean forward KL(p_T‖p_S) per
    example and the fraction of examples where both predict the same class.

    ``encoded``: ``{"teacher": (examples, collator), "student": (examples, collator)}``, each encoded
    by the model's own tokenizer (classifiers may tokenize differently); only rows present in both
    (same ``example_id``) are scored.
    """
    check_classifiers(teacher, student)
    common = {e["example_id"] for e in encoded["teacher"][0]} & {e["example_id"] for e in encoded["student"][0]}
    if not common:
        raise DataError("no held-out example has a token for both the teacher's and the student's tokenizer")
    logits: dict[str, Tensor] = {}
    labels = None
    for name, model in (("teacher", teacher), ("student", student)):
        examples, collator = encoded[name]
        kept = sorted((e for e in examples if e["example_id"] in common), key=lambda e: e["example_id"])
        parts, ys = [], []
        model.eval()
        for batch in _batches(kept, collator, batch_size, 0, device):
            parts.append(model(**_inputs(batch)).logits.float().cpu())
            ys.append(batch["labels"].cpu())
        logits[name], labels = torch.cat(parts), torch.cat(ys)
    t, s = logits["teacher"], logits["student"]
    kl = float(distribution_loss(s, t, kind="forward_kl"))
    return {"teacher": classification_metrics(t, labels, bins), "student": classification_metrics(s, labels, bins),
            "vs_teacher": {"kl": kl, "agreement": accuracy(s.argmax(-1), t.argmax(-1)),
                           "examples": int(labels.numel())}}


def _logit_rows(model: nn.Module, task: str, inputs: dict, valid: Tensor) -> Callable[[int, int], Tensor]:
    """``rows(start, stop)`` → logits (n, V) of the valid positions ``start:stop``.

    Causal LMs: the base model's final hidden states at positions 0..L−2 (position t predicts
    token t+1), projected by the LM head chunk by chunk (never (B, L, V) at once); masked LMs: the
    model's logits."""
    if task == "causal":
        from kdistill.models.heads import lm_head_of

        hidden = model.base_model(**inputs).last_hidden_state[:, :-1][valid]
        head = lm_head_of(model)
        return lambda a, b: head.logits(hidden[a:b].to(head.weight.dtype)).float()
    logits = model(**inputs).logits[valid]
    return lambda a, b: logits[a:b].float()


@torch.no_grad()
def lm_quality(teacher: nn.Module, student: nn.Module, task: str, examples: list[dict], collator: Callable, *,
               vocab_map: VocabMap | None = None, vocab_size: int | None = None, batch_size: int = 8,
               device: str = "cpu", seed: int = 0, chunk: int = 1024) -> dict:
    """Perplexity of both models, and KL(p_T‖p_S) / top-1 agreement of the student, on ``examples``
    encoded for the teacher's tokenizer (``labels`` −100 where not scored).

    Perplexity = ``exp(Σ_valid −log p(y) / n_valid)`` (token-weighted over every batch), each model
    over its full output. KL = ``Σ_valid KL(p_T ‖ p_S) / n_valid`` over the compared vocabulary
    (``vocab_size`` leading ids, or the student's ids mapped by ``vocab_map``); agreement =
    fraction of valid positions with ``argmax p_T = argmax p_S`` (the student's id mapped to the
    teacher's).
    """
    teacher.eval(), student.eval()
    nll = {"teacher": 0.0, "student": 0.0}
    kl_sum, agree, count, dropped = 0.0, 0, 0, 0
    for batch in _batches(examples, collator, batch_size, seed, device):
        labels = batch["labels"][:, 1:] if task == "causal" else batch["labels"]
        valid = labels != IGNORE_INDEX
        s_inputs = _inputs(batch)
        s_labels = labels
        if vocab_map is not None:
            s_labels = vocab_map.to_student(labels)
            mapped = s_labels >= 0
            dropped += int((valid & ~mapped).sum())
            valid = valid & mapped
            ids = vocab_map.to_student(s_inputs["input_ids"])
            s_inputs = {**s_inputs, "input_ids": ids.clamp_min(0)}  # a dropped input id: the student's id 0
        n = int(valid.sum())
        if n == 0:
            continue
        t_rows = _logit_rows(teacher, task, _inputs(batch), valid)
        s_rows = _logit_rows(student, task, s_inputs, valid)
        t_y, s_y = labels[valid], s_labels[valid]
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            t, s = t_rows(a, b), s_rows(a, b)
            nll["teacher"] += float(F.cross_entropy(t, t_y[a:b], reduction="sum"))
            nll["student"] += float(F.cross_entropy(s, s_y[a:b], reduction="sum"))
            if vocab_map is None:
                width = vocab_size or t.shape[-1]
                kl_sum += float(distribution_loss(s, t, kind="forward_kl", num_valid=1.0, vocab_size=vocab_size))
                agree += int((t[:, :width].argmax(-1) == s[:, :width].argmax(-1)).sum())
            else:
                n2o = vocab_map.new_to_old.to(t.device)
                s = s[:, : n2o.numel()]
                # support: every student id j, whose teacher log-prob is that of teacher id new_to_old[j]
                support = torch.arange(n2o.numel(), device=t.device).expand(b - a, -1)
                targets = SparseTargets(support, t.log_softmax(-1)[:, n2o])
                kl_sum += float(distribution_loss(s, targets, kind="forward_kl", num_valid=1.0,
                                                  missing_mass="tail"))
                agree += int((t.argmax(-1) == n2o[s.argmax(-1)]).sum())
        count += n
    if count == 0:
        raise ConfigError("no positions to evaluate: every held-out example has its labels masked")

    def ppl(total: float) -> float:
        mean = total / count
        return math.exp(mean) if mean < 700 else float("inf")

    result = {name: {"perplexity": ppl(total), "nll": total / count, "tokens": count} for name, total in nll.items()}
    result["vs_teacher"] = {"kl": kl_sum / count, "agreement": agree / count, "tokens": count,
                            "untranslatable_tokens": dropped, "vocabulary": "trimmed (kdistill_vocab.json)"
                            if vocab_map is not None else "shared"}
    return result


# ---------------------------------------------------------------------------- generation (instruction data)


def rouge_l_scorer() -> tuple[Callable[[str, str], float], str]:
    """``(score(prediction, reference) -> ROUGE-L F, implementation name)``: ``rouge_score`` when
    installed, else kdistill's own ROUGE-L (``kdistill.blackbox.filters.rouge_l_f``, same values)."""
    try:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        return (lambda pred, ref: scorer.score(ref, pred)["rougeL"].fmeasure), "rouge_score"
    except ImportError:
        from kdistill.blackbox.filters import rouge_l_f

        return rouge_l_f, "kdistill.blackbox.filters"


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 64,
                    batch_size: int = 8, device: str = "cpu") -> list[str]:
    """Greedy continuations of tokenized prompts (left-padded in batches), decoded without specials."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return outputs


def generation_quality(models: dict[str, tuple[nn.Module, object]], prompts: dict[str, list[list[int]]],
                       references: list[str], *, max_new_tokens: int = 64, batch_size: int = 8,
                       device: str = "cpu") -> dict:
    """Mean ROUGE-L F of each model's greedy outputs against ``references``.

    ``models``: name → (model, tokenizer); ``prompts``: name → tokenized prompts (per tokenizer).
    Returns name → ``{"rouge_l", "examples", "samples": first 3 outputs}`` plus ``"scorer"``.
    """
    score, name = rouge_l_scorer()
    result: dict = {"scorer": name}
    for key, (model, tokenizer) in models.items():
        texts = greedy_generate(model, tokenizer, prompts[key], max_new_tokens=max_new_tokens,
                                batch_size=batch_size, device=device)
        scores = [score(p, r) for p, r in zip(texts, references)]
        result[key] = {"rouge_l": sum(scores) / len(scores) if scores else float("nan"), "examples": len(scores),
                       "samples": texts[:3]}
    return result
