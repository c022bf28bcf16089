"""GPT3Mix: prompt, parsing, soft labels (log-probs, scoring call, vote), resumable output, training mix."""

from __future__ import annotations

import json
import math
import random

import pytest

from kdistill.blackbox.backends import BudgetExhausted, Completion, SamplingParams
from kdistill.blackbox.gptmix import (
    GPT3MixConfig,
    augment,
    build_prompt,
    label_mass,
    parse_completion,
    sample_examples,
    soft_label,
)
from kdistill.errors import ConfigError

CONFIG = GPT3MixConfig("movie review", "sentiment", ("negative", "positive"), k=2)
REAL = [("a dull mess", 0), ("pure joy", 1), ("tedious and long", 0), ("a delight", 1), ("flat", 0)]


def _pieces(text: str) -> list[str]:
    """Split like a byte-level tokenizer would: words with their leading space, punctuation apart."""
    import re

    return re.findall(r" ?\w+|[^\w ]| ", text)


class ScriptedTeacher:
    """A deterministic text generator implementing the TextTeacher protocol (a test double for a
    real LLM): it writes the next scripted line, with top log-probs at each token when asked."""

    def __init__(self, lines: list[str], label_probs: dict[str, float] | None = None, with_logprobs: bool = True,
                 fail_after: int | None = None) -> None:
        self.name, self.lines, self.label_probs = "scripted", lines, label_probs or {" positive": -0.2,
                                                                                   " negative": -1.7}
        self.with_logprobs, self.calls, self.fail_after, self.cursor = with_logprobs, 0, fail_after, 0

    def _complete_one(self, prompt: str, params: SamplingParams, logprobs: int | None) -> Completion:
        if params.max_tokens == 1:  # scoring call at the label slot
            top = [dict(self.label_probs)] if logprobs and self.with_logprobs else None
            return Completion(" positive", [" positive"], [-0.2], top, "length")
        if prompt.rstrip().endswith(":") and "Movie review:" not in prompt.splitlines()[-1]:  # vote
            return Completion(random.Random(len(prompt) + self.calls).choice([" positive", " positive", " negative"]))
        line = self.lines[self.cursor % len(self.lines)]
        self.cursor += 1
        tokens = _pieces(line)
        top = None
        if logprobs and self.with_logprobs:
            top = [{tok: -0.1} for tok in tokens]
            for i, tok in enumerate(tokens):
                if tok.strip() in ("positive", "negative"):
                    top[i] = dict(self.label_probs)
        return Completion(line, tokens, [-0.1] * len(tokens), top, "stop")

    def complete(self, prompts, params, n=1, logprobs=None):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise BudgetExhausted("budget", partial=[None] * len(prompts))
        return [[self._complete_one(p, params, logprobs) for _ in range(n)] for p in prompts]


def test_prompt_names_types_and_labels() -> None:
    prompt = build_prompt(CONFIG, [("a dull mess", 0), ("pure joy", 1)])
    assert prompt == (
        "Each item in the following list contains a movie review and the respective sentiment. "
        "The sentiment is one of 'negative' or 'positive'.\n"
        "Movie review: a dull mess (Sentiment: negative)\n"
        "Movie review: pure joy (Sentiment: positive)\n"
        "Movie review:"
    )


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="duplicate label"):
        GPT3MixConfig("review", "sentiment", ("pos", "POS"))
    with pytest.raises(ConfigError, match="empty"):
        GPT3MixConfig("review", "sentiment", ("pos", " "))
    with pytest.raises(ConfigError, match="must be named"):
        GPT3MixConfig("", "sentiment", ("a", "b"))
    with pytest.raises(ConfigError, match="larger than the 5 real examples"):
        sample_examples(REAL, GPT3MixConfig("r", "s", ("a", "b"), k=6), random.Random(0))


def test_balanced_sampling_alternates_classes() -> None:
    for seed in range(20):
        chosen = sample_examples(REAL, GPT3MixConfig("r", "s", ("a", "b"), k=4), random.Random(seed))
        assert sorted(REAL[i][1] for i in chosen) == [0, 0, 1, 1]


def test_parsing() -> None:
    parsed = parse_completion(" a warm, funny film (Sentiment: Positive)", CONFIG)
    assert parsed.text == "a warm, funny film" and parsed.label == 1
    assert " a warm, funny film (Sentiment: Positive)"[parsed.label_char:].startswith("Positive")
    assert parse_completion(" no label here", CONFIG) is None
    assert parse_completion(" text (Sentiment: mixed)", CONFIG) is None
    assert parse_completion(" (Sentiment: positive)", CONFIG) is None


def test_label_mass_sums_variants_and_detects_ambiguity() -> None:
    top = {" positive": math.log(0.5), "Positive": math.log(0.1), " neg": math.log(0.2), " the": math.log(0.2)}
    mass = label_mass(top, ["negative", "positive"])
    assert mass == pytest.approx([0.2, 0.6])
    assert label_mass({" very": -0.1}, ["very bad", "very good"]) is None


def test_soft_label_from_logprobs_scoring_and_vote() -> None:
    line = " a warm, funny film (Sentiment: positive)"
    parsed = parse_completion(line, CONFIG)
    prompt = build_prompt(CONFIG, REAL[:2])
    teacher = ScriptedTeacher([line])
    [[completion]] = teacher.complete([prompt], CONFIG.params, logprobs=5)
    probs, source = soft_label(teacher, prompt, completion, parsed, CONFIG)
    p_pos, p_neg = math.exp(-0.2), math.exp(-1.7)
    assert source == "logprobs" and probs == pytest.approx([p_neg / (p_pos + p_neg), p_pos / (p_pos + p_neg)])
    # no log-probs on the completion: a scoring call at the label slot
    bare = Completion(line, [], [], None, "stop")
    probs, source = soft_label(teacher, prompt, bare, parsed, CONFIG)
    assert source == "scoring" and probs[1] > probs[0]
    # a provider with no log-probs at all: a vote over samples of the label slot
    mute = ScriptedTeacher([line], with_logprobs=False)
    probs, source = soft_label(mute, prompt, bare, parsed, CONFIG)
    assert source == "vote" and sum(probs) == pytest.approx(1.0)


def test_augment_writes_rows_resumes_and_keeps_rows_on_budget(tmp_path) -> None:
    lines = [" a warm, funny film (Sentiment: positive)", " garbage without a label",
             " a slog from start to end (Sentiment: negative)"]
    out = tmp_path / "synthetic.jsonl"
    stats = augment(ScriptedTeacher(lines), REAL, CONFIG, out, num_examples=4, seed=3, batch_size=2)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and stats.dropped_unparsable >= 1
    assert all(r["source"] == "synthetic" and len(r["probs"]) == 2 and len(r["prompt_examples"]) == 2 for r in rows)
    assert len({r["id"] for r in rows}) == 4

    # killed by the budget after 2 calls: rows made so far stay; a rerun completes without duplicates
    out2 = tmp_path / "resumed.jsonl"
    with pytest.raises(BudgetExhausted):
        augment(ScriptedTeacher(lines, fail_after=2), REAL, CONFIG, out2, num_examples=6, seed=3, batch_size=2)
    kept = [json.loads(x)["id"] for x in out2.read_text().splitlines()]
    assert 0 < len(kept) < 6
    augment(ScriptedTeacher(lines), REAL, CONFIG, out2, num_examples=6, seed=3, batch_size=2)
    ids = [json.loads(x)["id"] for x in out2.read_text().splitlines()]
    assert len(ids) == 6 and len(set(ids)) == 6 and ids[: len(kept)] == kept
