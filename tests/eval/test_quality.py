"""Quality metrics pinned on hand-made inputs, and teacher–student comparisons on tiny real models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from kdistill.data import CausalLMFormat, Collator, MaskedLMFormat
from kdistill.errors import ConfigError
from kdistill.eval.quality import (
    VocabMap,
    accuracy,
    calibration,
    classification_metrics,
    lm_comparison,
    lm_quality,
    load_vocab_map,
    macro_f1,
)
from kdistill.models.student import student_from_teacher

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/eval/conftest.py


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_accuracy_and_macro_f1_by_hand() -> None:
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    gold = torch.tensor([0, 1, 1, 1, 2, 0])
    # class 0: TP 1 (#0), FP 1 (#1), FN 1 (#5) -> 2/(2+1+1) = 0.5
    # class 1: TP 2 (#2, #3), FP 0, FN 1 (#1)  -> 4/5 = 0.8
    # class 2: TP 1 (#4), FP 1 (#5), FN 0      -> 2/3
    assert accuracy(pred, gold) == pytest.approx(4 / 6)
    assert macro_f1(pred, gold) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a class nobody predicts nor has: absent from the default average, scores 0 with num_classes
    assert macro_f1(pred, gold, num_classes=4) == pytest.approx((0.5 + 0.8 + 2 / 3) / 4)


def test_ece_and_reliability_bins_by_hand() -> None:
    # confidences 0.95 (right), 0.95 (wrong), 0.65 (right), 0.62 (right), 0.55 (wrong); 15 bins of 1/15
    conf = torch.tensor([0.95, 0.95, 0.65, 0.62, 0.55])
    pred = torch.tensor([1, 1, 0, 1, 0])
    gold = torch.tensor([1, 0, 0, 1, 1])
    probs = torch.stack([torch.where(pred == 1, 1 - conf, conf), torch.where(pred == 1, conf, 1 - conf)], -1)
    # bins: (14/15, 1] holds both 0.95 (acc 1/2, conf 0.95); (9/15, 10/15] holds 0.65, 0.62 (acc 1,
    # conf 0.635); (8/15, 9/15] holds 0.55 (acc 0, conf 0.55)
    expected = 2 / 5 * abs(0.5 - 0.95) + 2 / 5 * abs(1 - 0.635) + 1 / 5 * abs(0 - 0.55)
    result = calibration(probs, gold)
    assert result["ece"] == pytest.approx(expected)
    assert len(result["bins"]) == 15
    counts = {b: row["count"] for b, row in enumerate(result["bins"]) if row["count"]}
    assert counts == {14: 2, 9: 2, 8: 1}
    assert result["bins"][9]["confidence"] == pytest.approx(0.635)
    assert result["bins"][0]["accuracy"] is None
    full = classification_metrics(probs.log(), gold)
    assert full["ece"] == pytest.approx(expected) and full["accuracy"] == pytest.approx(3 / 5)


def test_perfectly_calibrated_and_confident_predictions_have_zero_ece() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert calibration(probs, torch.tensor([0, 1]))["ece"] == 0.0


def _causal(tiny_assets, n: int = 12):
    tok = AutoTokenizer.from_pretrained(tiny_assets["gpt2"])
    examples = CausalLMFormat("text", 16).encode(_rows(tiny_assets["dev"])[:n], tok)
    return tok, examples, Collator(tok, "causal")


def test_student_equal_to_teacher_has_zero_kl_and_full_agreement(tiny_assets) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["gpt2"])
    tok, examples, collator = _causal(tiny_assets)
    result = lm_quality(model, model, "causal", examples, collator, batch_size=5)
    assert result["vs_teacher"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["vs_teacher"]["agreement"] == 1.0
    assert result["teacher"]["perplexity"] == pytest.approx(result["student"]["perplexity"])

    mlm = AutoModelForMaskedLM.from_pretrained(tiny_assets["bert-mlm"])
    btok = AutoTokenizer.from_pretrained(tiny_assets["bert-mlm"])
    masked = MaskedLMFormat("text", 16).encode(_rows(tiny_assets["dev"]), btok)
    result = lm_quality(mlm, mlm, "mlm", masked, Collator(btok, "mlm", mlm_probability=0.3), batch_size=8)
    assert result["vs_teacher"]["tokens"] > 0
    assert result["vs_teacher"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["vs_teacher"]["agreement"] == 1.0


def test_perplexity_is_exp_of_the_token_weighted_mean_ce(tiny_assets) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny_assets["gpt2"]).eval()
    student = student_from_teacher(teacher, [0, 3]).eval()
    tok, examples, collator = _causal(tiny_assets)
    result = lm_quality(teacher, student, "causal", examples, collator, batch_size=5, chunk=7)
    for name, model in (("teacher", teacher), ("student", student)):
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(examples), 4):  # other batches: the result must not depend on them
                batch = collator(examples[start:start + 4])
                n = int((batch["labels"][:, 1:] != -100).sum())
                loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss
                total, count = total + loss.item() * n, count + n
        assert result[name]["tokens"] == count
        assert result[name]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["vs_teacher"]["kl"] > 0 and 0 <= result["vs_teacher"]["agreement"] <= 1


def test_trimmed_student_is_compared_in_the_teachers_id_space(tiny_assets, tmp_path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny_assets["gpt2"]).eval()
    tok, examples, collator = _causal(tiny_assets)
    # the dev sentences never use these words: drop them from the student's vocabulary
    dropped = [tok.convert_tokens_to_ids(w) for w in ("fine", "poor", "it", "this", "and")]
    size = teacher.get_output_embeddings().weight.shape[0]
    new_to_old = [i for i in range(size) if i not in dropped]
    student = AutoModelForCausalLM.from_pretrained(tiny_assets["gpt2"]).eval()
    student.resize_token_embeddings(len(new_to_old))
    with torch.no_grad():
        student.get_input_embeddings().weight.copy_(teacher.get_input_embeddings().weight[new_to_old])
    (tmp_path / "kdistill_vocab.json").write_text(json.dumps({"new_to_old": new_to_old}))
    vocab_map = load_vocab_map(tmp_path, size)
    assert vocab_map is not None and vocab_map.to_student(torch.tensor([dropped[0], new_to_old[3]])).tolist() == [-1, 3]

    result = lm_quality(teacher, student, "causal", examples, collator, vocab_map=vocab_map, batch_size=6)
    # expected, from the teacher alone: the student is the teacher restricted to the kept ids, so
    # p_S = p_T / (1 − m) on them (m: the teacher's mass on dropped ids) and KL with the tail bucket
    # (student tail floored at 1e-6) is (1 − m) log(1 − m) + m log(m / 1e-6)
    kl, agree, nll_s, n = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 6):
            batch = collator(examples[start:start + 6])
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            valid = batch["labels"][:, 1:] != -100
            logp = logits[valid].double().log_softmax(-1)
            m = logp[:, dropped].exp().sum(-1)
            kl += float(((1 - m) * torch.log1p(-m) + m * torch.log(m / 1e-6)).sum())
            agree += int((~torch.isin(logp.argmax(-1), torch.tensor(dropped))).sum())
            y = batch["labels"][:, 1:][valid]
            nll_s += float((-(logp.gather(-1, y[:, None])[:, 0]) + torch.log1p(-m)).sum())
            n += int(valid.sum())
    assert result["vs_teacher"]["kl"] == pytest.approx(kl / n, rel=1e-4)
    assert result["vs_teacher"]["agreement"] == pytest.approx(agree / n)
    assert result["student"]["perplexity"] == pytest.approx(math.exp(nll_s / n), rel=1e-4)
    assert result["vs_teacher"]["untranslatable_tokens"] == 0


def test_different_tokenizers_without_a_vocabulary_map_are_not_comparable(tiny_assets, tmp_path) -> None:
    gpt_tok = AutoTokenizer.from_pretrained(tiny_assets["gpt2"])
    bert_tok = AutoTokenizer.from_pretrained(tiny_assets["bert-mlm"])
    with pytest.raises(ConfigError, match="not comparable on perplexity, KL and agreement: their tokenizers differ"):
        lm_comparison(gpt_tok, bert_tok, tmp_path, 32, 32)
    assert lm_comparison(gpt_tok, gpt_tok, None, 32, 32) == (None, None)
    assert lm_comparison(gpt_tok, gpt_tok, None, 40, 36) == (None, len(gpt_tok))
    with pytest.raises(ConfigError, match="outside the teacher's vocabulary"):
        VocabMap.from_new_to_old([0, 99], 32)


def test_rouge_l_fallback_matches_rouge_score() -> None:
    pred, ref = "the cat sat on the mat", "a cat was sitting on the mat"
    # LCS = cat, on, the, mat = 4; P = 4/6, R = 4/7 -> F = 2PR/(P+R) = 8/13
    from kdistill.blackbox.filters import rouge_l_f

    assert rouge_l_f(pred, ref) == pytest.approx(8 / 13)
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    assert rouge_score.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure == pytest.approx(8 / 13)
