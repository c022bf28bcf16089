"""Filters: ROUGE-L novelty (fast == rouge_score decisions), keywords, length, start, duplicates, decontamination."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kdistill.blackbox.filters import (
    Decontaminator,
    ExampleFilter,
    FilterConfig,
    KeywordBlocklist,
    MinHashDeduplicator,
    RougeNoveltyFilter,
    bad_start,
    instruction_reason,
    length_ok,
    load_eval_sets,
    lsh_bands,
    near_duplicates,
    reference_rouge_novelty,
    rouge_l_f,
    rouge_tokenize,
    shingles,
)
from kdistill.blackbox.self_instruct import default_seed_path
from kdistill.errors import ConfigError, DataError

ORIGINAL_SEEDS = Path(__file__).resolve().parents[3] / "shared" / "data" / "self-instruct" / "seed_tasks.jsonl"


def seed_instructions() -> list[str]:
    path = ORIGINAL_SEEDS if ORIGINAL_SEEDS.exists() else default_seed_path()
    return [json.loads(line)["instruction"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def variants(base: list[str], n: int, seed: int) -> list[str]:
    """Random instructions from the seeds: near copies (a word dropped, swapped or replaced),
    recombinations (halves of two seeds) and untouched seeds."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(base).split(), rng.choice(base).split()
        kind = rng.random()
        if kind < 0.35 and len(a) > 2:
            a.pop(rng.randrange(len(a)))
        elif kind < 0.55 and len(a) > 2:
            i = rng.randrange(len(a) - 1)
            a[i], a[i + 1] = a[i + 1], a[i]
        elif kind < 0.7:
            a[rng.randrange(len(a))] = rng.choice(b)
        elif kind < 0.9:
            a = a[: len(a) // 2] + b[len(b) // 2 :]
        out.append(" ".join(a))
    return out


# ------------------------------------------------------------------------------------------ ROUGE-L


@pytest.fixture(scope="module")
def rouge_scorer():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    return rs.RougeScorer(["rougeL"], use_stemmer=False)


def test_tokenizer_matches_rouge_score(rouge_scorer):
    texts = ["Hello, WORLD!  it's 3.14 -- déjà vu_x", "İstanbul ß café", "", "   ", "a\tb\nc", "ÅÄÖ x2y"]
    for t in texts + seed_instructions()[:50]:
        assert rouge_tokenize(t) == rouge_scorer._tokenizer.tokenize(t)


def test_rouge_l_f_matches_rouge_score(rouge_scorer):
    texts = variants(seed_instructions(), 120, seed=1)
    for a, b in zip(texts, texts[1:] + texts[:1]):
        assert rouge_l_f(a, b) == rouge_scorer.score(a, b)["rougeL"].fmeasure
    assert rouge_l_f("", "x") == 0.0


@pytest.mark.parametrize("inclusive, n", [(True, 300), (False, 150)])
def test_fast_novelty_equals_reference(rouge_scorer, inclusive, n):
    base = seed_instructions()
    texts = variants(base, n, seed=7)
    pool = base[:20]
    fast = RougeNoveltyFilter(0.7, pool, inclusive=inclusive).filter(texts)
    ref = reference_rouge_novelty(texts, pool, 0.7, inclusive=inclusive)
    assert fast == ref
    assert 0 < sum(fast) < len(fast)  # both decisions occur


def test_exact_threshold_follows_the_comparison(rouge_scorer):
    # 10 tokens each, LCS 7: precision = recall = 0.7
    a = "one two three four five six seven eight nine ten"
    b = "one two three four five six seven x y z"
    f = rouge_scorer.score(a, b)["rougeL"].fmeasure
    for inclusive in (True, False):
        for threshold in (f, 0.7, 0.69999):
            fast = RougeNoveltyFilter(threshold, [a], inclusive=inclusive).offer(b)
            assert [fast] == reference_rouge_novelty([b], [a], threshold, inclusive=inclusive)


def test_novelty_filter_basics():
    flt = RougeNoveltyFilter(0.7, ["Write a poem about the sea."])
    assert not flt.offer("write a POEM about the sea!")
    assert flt.offer("List three prime numbers below twenty.")
    assert not flt.offer("List three prime numbers below twenty")  # now in the pool
    assert flt.offer("")  # no tokens: F = 0 with everything
    assert flt.size == 3
    with pytest.raises(ConfigError, match="rouge_threshold"):
        RougeNoveltyFilter(0.0)


def test_length_pruning_skips_impossible_pairs():
    flt = RougeNoveltyFilter(0.7, ["a b c d e f g h i j k l m n o p q r s t"])  # 20 tokens
    assert flt.offer("a b c")  # 3 tokens: 2·3/23 < 0.7, never compared
    assert flt.pairs_scored == 0


# ------------------------------------------------------------------------------------------ instruction filters


def test_keyword_blocklist():
    kb = KeywordBlocklist()
    assert kb.find("Describe a picture of a cat.") == "picture"
    assert kb.find("Please GO TO the store.") == "go to"
    assert kb.find("Open the drawer and describe the mapping.") is None  # whole words only
    assert kb.find("Summarize this audio transcript.") == "audio"
    custom = KeywordBlocklist(["weather", "stock price"])
    assert custom.find("What is the stock price of X?") == "stock price" and custom.find("Draw it") is None
    assert KeywordBlocklist([]).find("image") is None


def test_length_and_start():
    assert not length_ok("Too short here")  # 3 words
    assert length_ok("Four words are enough")
    assert length_ok(" ".join(["w"] * 150)) and not length_ok(" ".join(["w"] * 151))
    assert bad_start('"Quoted instruction here."') and bad_start("¿Qué hora es ahora?") and bad_start("  - bullet")
    assert not bad_start("3 ways to save money") and not bad_start("Write a story.")


def test_instruction_reason_order_and_options():
    fc = FilterConfig()
    assert instruction_reason("Draw", fc) == "length"
    assert instruction_reason("Draw a picture of the moon.", fc) == "keywords"
    assert instruction_reason("- Write a story about a dog.", fc) == "bad_start"
    assert instruction_reason("- Write a story about a dog.", FilterConfig(drop_bad_start=False)) is None
    assert instruction_reason("Draw a picture of the moon.", FilterConfig(blocklist=())) is None


def test_filter_config_errors():
    with pytest.raises(ConfigError, match="rouge_threshold"):
        FilterConfig(rouge_threshold=1.5)
    with pytest.raises(ConfigError, match="min_words/max_words"):
        FilterConfig(min_words=10, max_words=5)
    with pytest.raises(ConfigError, match="decontam_ngram"):
        FilterConfig(decontam_ngram=0)


# ------------------------------------------------------------------------------------------ duplicates


LONG = ("The committee reviewed the annual budget and decided to move funds from road repairs to the new "
        "public library, citing strong support from residents at the spring meeting")


def test_minhash_finds_near_duplicates():
    near = LONG.replace("strong", "very strong")  # one word added
    other = "Write a short story about a lighthouse keeper who befriends a seal during a long winter storm"
    assert near_duplicates([LONG, other, near, LONG.upper()]) == [None, None, 0, 0]


def test_instances_of_one_long_instruction_are_not_near_duplicates():
    instruction = ("Read the customer review of the restaurant below carefully and classify its overall sentiment "
                   "as positive, negative or mixed, taking into account food, service, price and atmosphere")
    flt = ExampleFilter(FilterConfig())
    rows = [{"instruction": instruction, "input": i, "output": o} for i, o in
            [("Great food.", "Positive"), ("Cold soup.", "Negative"), ("Great food!", "Positive")]]
    assert [flt.keep(r) for r in rows] == [True, True, False]
    assert flt.counts == {"near_duplicate": 1}


def test_minhash_never_flags_below_threshold():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)]
    texts = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(200)]
    assert near_duplicates(texts) == [None] * 200


def test_minhash_recall_on_edited_copies():
    rng = random.Random(1)
    words = [f"w{i}" for i in range(5000)]
    dedup = MinHashDeduplicator(threshold=0.8)
    found = total = 0
    for _ in range(100):
        base = [rng.choice(words) for _ in range(60)]
        copy = list(base)
        copy[rng.randrange(60)] = rng.choice(words)  # one substitution: Jaccard ≈ 0.9
        sa, sb = shingles(" ".join(base)), shingles(" ".join(copy))
        if len(sa & sb) < 0.8 * len(sa | sb):
            continue
        assert dedup.add(" ".join(base)) is None
        total += 1
        found += dedup.add(" ".join(copy)) is not None
    assert total > 50 and found >= 0.95 * total


def test_lsh_bands_reach_the_recall():
    bands, rows = lsh_bands(128, 0.8)
    assert bands * rows <= 128 and 1 - (1 - 0.8**rows) ** bands >= 0.95


# ------------------------------------------------------------------------------------------ decontamination


def test_decontamination_by_ngram():
    eval_sets = {"mmlu": ["Which of the following best describes the role of mitochondria in the cell during "
                          "aerobic respiration in humans?"],
                 "short": ["What is the capital city of the country of Peru"],
                 "tiny": ["Yes or no?"]}
    decon = Decontaminator(eval_sets, n=13)
    leaked = ("Answer: which of the following best describes the role of mitochondria in the cell during "
              "aerobic respiration")
    assert decon.match(leaked) == "mmlu"
    assert decon.match("Describe the role of mitochondria in the cell.") is None  # shorter overlap
    assert decon.match("Quiz: what is the capital city of the country of Peru? Lima.") == "short"  # whole short item
    assert decon.match("Answer yes or no? Maybe.") is None  # below min_tokens: ignored
    assert Decontaminator({"x": ["a b c d e"]}, n=3).match("z c d e z") == "x"


def test_eval_sets_from_files(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"question": "Which gas do plants take in from the air to make sugar by "
                                            "photosynthesis in their green leaves", "answer": "CO2", "id": 3}) + "\n")
    sets = load_eval_sets({"science": str(path)})
    assert sets == {"science": ["Which gas do plants take in from the air to make sugar by photosynthesis in their "
                                "green leaves", "CO2"]}
    decon = Decontaminator(sets)
    assert decon.match("Q: which gas do plants take in from the air to make sugar by photosynthesis?") == "science"
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"id": 1, "score": 0.5}\n{"id": 2, "text": "  "}\n')
    with pytest.raises(DataError, match=f"^evaluation set {numbers}: no text to decontaminate against"):
        load_eval_sets([str(numbers)])


# ------------------------------------------------------------------------------------------ example filter


def test_example_filter_counts():
    flt = ExampleFilter(FilterConfig(), Decontaminator({"gsm8k": ["natalia sold clips to 48 of her friends in "
                                                                   "april and then she sold half as many clips in may"]}))
    rows = [
        {"instruction": "Summarize the text.", "input": "A", "output": "", "finish_reason": "stop"},  # empty
        {"instruction": "Repeat the input.", "input": "same", "output": "same", "finish_reason": "stop"},  # = input
        {"instruction": "Write a story.", "input": "", "output": "Once upon a", "finish_reason": "length"},
        {"instruction": "Add two numbers.", "input": "2 3", "output": "5", "finish_reason": "stop"},  # kept
        {"instruction": "add two  NUMBERS.", "input": "2 3", "output": "5", "finish_reason": "stop"},  # exact dup
        {"instruction": "Explain.", "input": LONG, "output": "ok", "finish_reason": "stop"},  # kept
        {"instruction": "Explain.", "input": LONG + " again", "output": "ok", "finish_reason": "stop"},  # near dup
        {"instruction": "Solve.", "input": "Natalia sold clips to 48 of her friends in April, and then she sold half "
         "as many clips in May. How many?", "output": "72", "finish_reason": "stop"},  # contaminated
    ]
    kept = [flt.keep(r) for r in rows]
    assert kept == [False, False, False, True, False, True, False, False]
    assert flt.counts == {"empty_output": 2, "truncated": 1, "exact_duplicate": 1, "near_duplicate": 1,
                          "contaminated": 1}
    assert flt.contaminated_by == {"gsm8k": 1}


def test_example_filter_switches():
    flt = ExampleFilter(FilterConfig(drop_truncated=False, exact_dedup=False, near_dup_threshold=None))
    row = {"instruction": "Write.", "input": "", "output": "cut", "finish_reason": "length"}
    assert flt.keep(row) and flt.keep(row) and not flt.counts
