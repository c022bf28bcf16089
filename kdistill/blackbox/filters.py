"""Filters for generated instruction data (Self-Instruct, Alpaca), each counting what it drops.

| filter            | drops                                                                          |
|-------------------|--------------------------------------------------------------------------------|
| ``length``        | instructions of ≤ 3 or > 150 words (``str.split``), as Self-Instruct            |
| ``keywords``      | instructions holding a blocked word or phrase (whole words, any case)           |
| ``bad_start``     | instructions starting with ASCII punctuation or a non-ASCII character (optional)|
| ``rouge_l``       | instructions whose ROUGE-L F with any instruction already kept is ≥ 0.7          |
| ``empty_output``  | examples with an empty output (or an output equal to the input)                 |
| ``truncated``     | examples cut by the token limit (``finish_reason == "length"``)                 |
| ``exact_duplicate`` / ``near_duplicate`` | repeated examples: normalised text, then MinHash LSH   |
| ``contaminated``  | examples sharing an n-gram (default 13 tokens) with an evaluation set           |

**ROUGE-L** is the F-measure of the longest common subsequence of tokens, with the tokenizer of
``rouge_score`` without stemming (lowercase, every run of characters outside ``[a-z0-9]`` a
separator), computed with the same floating-point operations as
``rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)``, so keep/drop decisions are identical
to calling that scorer on every pair (:func:`reference_rouge_novelty`). :class:`RougeNoveltyFilter`
is fast because it tokenizes each text once, encodes tokens as characters, skips pool lengths for
which F ≥ threshold is impossible (F ≤ 2·min(a, b)/(a + b)) and computes the remaining LCS with
``rapidfuzz`` (bit-parallel, C++) in one call per candidate.

**Near duplicates**: MinHash signatures of word 3-shingles (numpy, multiply-shift hashing), banded
LSH for candidates, then the exact Jaccard similarity of the shingle sets decides (≥ 0.8), for the
whole example and for its input + output alike; the bands are chosen so that a pair at the
threshold becomes a candidate with probability ≥ 0.95.

Instruction-level filters run online in ``generate_instructions`` (as in Self-Instruct, so the
in-context machine instructions are kept ones); example-level ones in ``filter_examples``.
"""

from __future__ import annotations

import math
import re
import string
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from kdistill.errors import ConfigError, DataError

DEFAULT_BLOCKLIST: tuple[str, ...] = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)  # fmt: skip
"""Alpaca's list: tasks a text-only model cannot do (Self-Instruct's first 13 plus five)."""

FILTER_NAMES: tuple[str, ...] = (
    "length", "keywords", "bad_start", "rouge_l",
    "empty_output", "truncated", "exact_duplicate", "near_duplicate", "contaminated",
)  # fmt: skip

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")


@dataclass(frozen=True)
class FilterConfig:
    """Which filters run and their thresholds (``None`` or ``False`` switches one off)."""

    rouge_threshold: float | None = 0.7
    blocklist: tuple[str, ...] = DEFAULT_BLOCKLIST
    min_words: int = 4
    max_words: int = 150
    drop_bad_start: bool = True
    drop_truncated: bool = True
    drop_empty: bool = True
    exact_dedup: bool = True
    near_dup_threshold: float | None = 0.8
    minhash_perm: int = 128
    shingle_size: int = 3
    decontam_ngram: int = 13
    decontam_min_tokens: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocklist", tuple(self.blocklist))
        if self.rouge_threshold is not None and not 0.0 < self.rouge_threshold <= 1.0:
            raise ConfigError(f"rouge_threshold: must be in (0, 1], got {self.rouge_threshold}")
        if self.near_dup_threshold is not None and not 0.0 < self.near_dup_threshold <= 1.0:
            raise ConfigError(f"near_dup_threshold: must be in (0, 1], got {self.near_dup_threshold}")
        if not 0 <= self.min_words <= self.max_words:
            raise ConfigError(f"min_words/max_words: need 0 ≤ min ≤ max, got {self.min_words}, {self.max_words}")
        for name in ("minhash_perm", "shingle_size", "decontam_ngram", "decontam_min_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be ≥ 1, got {getattr(self, name)}")
        if any(not isinstance(w, str) or not w.strip() for w in self.blocklist):
            raise ConfigError("blocklist: entries must be non-empty strings")


# --------------------------------------------------------------------------------------------
# Instruction-level checks
# --------------------------------------------------------------------------------------------


def rouge_tokenize(text: str) -> list[str]:
    """Tokens as ``rouge_score``'s default tokenizer without stemming gives them."""
    return [t for t in _SPACES.split(_NON_ALNUM.sub(" ", text.lower())) if _VALID_TOKEN.match(t)]


def length_ok(text: str, min_words: int = 4, max_words: int = 150) -> bool:
    """``min_words ≤ words ≤ max_words`` with words from ``str.split``."""
    return min_words <= len(text.split()) <= max_words


class KeywordBlocklist:
    """Whole-word, case-insensitive search for any of ``words`` (phrases allowed)."""

    def __init__(self, words: Iterable[str] = DEFAULT_BLOCKLIST) -> None:
        self.words = tuple(words)
        alternatives = "|".join(re.escape(w.strip()) for w in sorted(self.words, key=len, reverse=True))
        self._re = re.compile(rf"\b({alternatives})\b", re.IGNORECASE) if self.words else None

    def find(self, text: str) -> str | None:
        """The first blocked word in ``text`` (lowercased), or ``None``."""
        if self._re is None:
            return None
        m = self._re.search(text)
        return m.group(1).lower() if m else None


def bad_start(text: str) -> bool:
    """Self-Instruct's rule: the text starts with ASCII punctuation or a non-ASCII character."""
    text = text.lstrip()
    return not text or text[0] in string.punctuation or not text[0].isascii()


# --------------------------------------------------------------------------------------------
# ROUGE-L novelty
# --------------------------------------------------------------------------------------------


def _f_measure(lcs: np.ndarray, target_len: int, pred_lens: np.ndarray) -> np.ndarray:
    """``rouge_score``'s F from LCS lengths, with its float operations in its order."""
    lcs = lcs.astype(np.float64)
    precision = lcs / pred_lens
    recall = lcs / target_len
    denom = precision + recall
    with np.errstate(invalid="ignore", divide="ignore"):
        f = 2 * precision * recall / denom
    return np.where(denom > 0, f, 0.0)


def _lcs_table_len(a: Sequence[Any], b: Sequence[Any]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f(a: str, b: str) -> float:
    """ROUGE-L F-measure of two texts (symmetric; equal to ``RougeScorer(["rougeL"])``'s)."""
    ta, tb = rouge_tokenize(a), rouge_tokenize(b)
    if not ta or not tb:
        return 0.0
    lcs = _lcs_table_len(ta, tb)
    precision, recall = lcs / len(tb), lcs / len(ta)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


class RougeNoveltyFilter:
    """Keep a text only if its ROUGE-L F with every text in the pool is below ``threshold``.

    ``offer(text)`` decides and adds kept texts to the pool; ``add(text)`` adds unconditionally
    (seed instructions). ``inclusive=False`` drops only above the threshold (``> 0.7``, the
    comparison in the Self-Instruct and Alpaca code; the paper says "less than 0.7" to keep).
    """

    def __init__(self, threshold: float = 0.7, pool: Iterable[str] = (), *, inclusive: bool = True) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"rouge_threshold: must be in (0, 1], got {threshold}")
        from rapidfuzz.distance import LCSseq
        from rapidfuzz.process import cdist

        self._cdist, self._scorer = cdist, LCSseq.similarity
        self.threshold = threshold
        self.inclusive = inclusive
        self._vocab: dict[str, int] = {}
        self._buckets: dict[int, list[str | list[int]]] = {}  # token count -> encoded texts
        self.size = 0
        self.pairs_scored = 0
        for text in pool:
            self.add(text)

    def _encode(self, text: str) -> str | list[int]:
        ids = [self._vocab.setdefault(t, len(self._vocab)) for t in rouge_tokenize(text)]
        # one character per token: rapidfuzz runs its bit-parallel LCS on strings
        return "".join(map(chr, ids)) if len(self._vocab) < 0x110000 else ids

    def _length_range(self, n: int) -> tuple[int, int]:
        """Pool lengths m for which 2·min(n, m)/(n + m) ≥ threshold is possible (with margin)."""
        t = self.threshold
        lo = math.floor(n * t / (2 - t) * (1 - 1e-9))
        hi = math.ceil(n * (2 - t) / t * (1 + 1e-9))
        return max(lo, 1), hi

    def max_score(self, text: str) -> float:
        """Highest ROUGE-L F of ``text`` with the pool among lengths that can reach the threshold
        (0.0 when none can)."""
        return self._max_score(self._encode(text))

    def _max_score(self, code: str | list[int]) -> float:
        n = len(code)
        if n == 0 or self.size == 0:
            return 0.0
        lo, hi = self._length_range(n)
        lengths = [m for m in range(lo, hi + 1) if m in self._buckets]
        if not lengths:
            return 0.0
        choices = list(chain.from_iterable(self._buckets[m] for m in lengths))
        counts = [len(self._buckets[m]) for m in lengths]
        lcs = self._cdist([code], choices, scorer=self._scorer, dtype=np.int32)[0]
        self.pairs_scored += len(choices)
        f = _f_measure(lcs, n, np.repeat(np.asarray(lengths, dtype=np.float64), counts))
        return float(f.max())

    def _is_novel(self, score: float) -> bool:
        return score < self.threshold if self.inclusive else score <= self.threshold

    def add(self, text: str) -> None:
        """Add ``text`` to the pool without checking it."""
        code = self._encode(text)
        self._buckets.setdefault(len(code), []).append(code)
        self.size += 1

    def offer(self, text: str) -> bool:
        """True (and ``text`` joins the pool) if it is novel enough, else False."""
        code = self._encode(text)
        if not self._is_novel(self._max_score(code)):
            return False
        self._buckets.setdefault(len(code), []).append(code)
        self.size += 1
        return True

    def filter(self, texts: Iterable[str]) -> list[bool]:
        """``offer`` each text in order: the keep/drop decisions."""
        return [self.offer(t) for t in texts]


def reference_rouge_novelty(
    texts: Iterable[str], pool: Iterable[str] = (), threshold: float = 0.7, *, inclusive: bool = True
) -> list[bool]:
    """The original loop: ``rouge_score`` on every (candidate, kept) pair. Slow; for checks only."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError("reference_rouge_novelty needs rouge-score (pip install rouge-score)") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept = list(pool)
    decisions = []
    for text in texts:
        scores = [scorer.score(text, other)["rougeL"].fmeasure for other in kept]
        best = max(scores, default=0.0)
        keep = best < threshold if inclusive else best <= threshold
        if keep:
            kept.append(text)
        decisions.append(keep)
    return decisions


# --------------------------------------------------------------------------------------------
# Duplicates
# --------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Lowercase, whitespace collapsed: the key of exact-duplicate detection."""
    return _SPACES.sub(" ", text.lower()).strip()


def shingles(text: str, size: int = 3) -> set[int]:
    """CRC-32 fingerprints of the word ``size``-grams (the whole text when shorter)."""
    toks = rouge_tokenize(text)
    if len(toks) < size:
        return {zlib.crc32(" ".join(toks).encode())} if toks else set()
    return {zlib.crc32(" ".join(toks[i : i + size]).encode()) for i in range(len(toks) - size + 1)}


def lsh_bands(num_perm: int, threshold: float, recall: float = 0.95) -> tuple[int, int]:
    """``(bands, rows)``: the most rows per band for which a pair with Jaccard ``threshold``
    shares a band with probability ≥ ``recall`` (1 row if none reaches it)."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            best = (bands, rows)
    return best


class MinHashDeduplicator:
    """Streaming near-duplicate detection: ``add(text)`` returns the index of an earlier kept
    text with shingle Jaccard ≥ ``threshold``, or ``None`` (and keeps ``text``).

    ``add(text, part=...)``: the pair counts only if ``part`` (a piece of ``text``) is also a near
    duplicate of the other's part. :class:`ExampleFilter` passes input + output, so instances of
    one task, which share a long instruction, are not taken for duplicates of each other.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle_size: int = 3, seed: int = 0) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"near_dup_threshold: must be in (0, 1], got {threshold}")
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self._b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.threshold = threshold
        self.shingle_size = shingle_size
        self.bands, self.rows = lsh_bands(num_perm, threshold)
        self._tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._sets: list[tuple[set[int], set[int] | None]] = []
        self._count = 0  # texts offered so far (the index add() reports)
        self._index: list[int] = []  # kept slot -> offered index

    def signature(self, sh: set[int]) -> np.ndarray:
        """(num_perm,) uint64 MinHash of a fingerprint set: min over x of (a·x + b mod 2⁶⁴) >> 32."""
        x = np.fromiter(sh, dtype=np.uint64, count=len(sh))
        return ((self._a[:, None] * x[None, :] + self._b[:, None]) >> np.uint64(32)).min(axis=1)

    def _similar(self, a: set[int], b: set[int]) -> bool:
        return len(a & b) >= self.threshold * len(a | b)

    def add(self, text: str, part: str | None = None) -> int | None:
        i = self._count
        self._count += 1
        sh = shingles(text, self.shingle_size)
        if not sh:
            return None
        part_sh = shingles(part, self.shingle_size) if part is not None else None
        sig = self.signature(sh)
        keys = [sig[k * self.rows : (k + 1) * self.rows].tobytes() for k in range(self.bands)]
        candidates = sorted({c for table, key in zip(self._tables, keys) for c in table.get(key, ())})
        for c in candidates:
            other, other_part = self._sets[c]
            if self._similar(sh, other) and (
                part_sh is None or other_part is None or self._similar(part_sh, other_part)
            ):
                return self._index[c]
        slot = len(self._sets)
        self._sets.append((sh, part_sh))
        self._index.append(i)
        for table, key in zip(self._tables, keys):
            table.setdefault(key, []).append(slot)
        return None


def near_duplicates(texts: Iterable[str], threshold: float = 0.8, **kwargs: Any) -> list[int | None]:
    """For each text, the index of an earlier kept near duplicate, or ``None``."""
    dedup = MinHashDeduplicator(threshold, **kwargs)
    return [dedup.add(t) for t in texts]


# --------------------------------------------------------------------------------------------
# Decontamination
# --------------------------------------------------------------------------------------------


class Decontaminator:
    """Flags texts that share a token ``n``-gram with an evaluation set.

    Evaluation texts shorter than ``n`` tokens are matched whole when they have at least
    ``min_tokens`` tokens (shorter ones are ignored: a 3-word answer is not a leak). Tokens are
    :func:`rouge_tokenize`'s.
    """

    def __init__(self, eval_sets: Mapping[str, Iterable[str]], n: int = 13, min_tokens: int = 8) -> None:
        if n < 1 or min_tokens < 1:
            raise ConfigError(f"decontam_ngram/decontam_min_tokens: must be ≥ 1, got {n}, {min_tokens}")
        self.n = n
        self._grams: dict[tuple[str, ...], str] = {}
        self._short_lengths: set[int] = set()
        for name, texts in eval_sets.items():
            for text in texts:
                toks = rouge_tokenize(text)
                if len(toks) >= n:
                    for i in range(len(toks) - n + 1):
                        self._grams.setdefault(tuple(toks[i : i + n]), name)
                elif len(toks) >= min_tokens:
                    self._grams.setdefault(tuple(toks), name)
                    self._short_lengths.add(len(toks))
        self._lengths = sorted(self._short_lengths | {n})

    def __len__(self) -> int:
        return len(self._grams)

    def match(self, text: str) -> str | None:
        """The name of an evaluation set sharing an n-gram with ``text``, or ``None``."""
        if not self._grams:
            return None
        toks = rouge_tokenize(text)
        for k in self._lengths:
            for i in range(len(toks) - k + 1):
                name = self._grams.get(tuple(toks[i : i + k]))
                if name is not None:
                    return name
        return None


def eval_texts_from_rows(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every string value of every row (prompts, inputs, references)."""
    return [v for row in rows for v in row.values() if isinstance(v, str) and v.strip()]


def load_eval_sets(sources: Mapping[str, str] | Iterable[str]) -> dict[str, list[str]]:
    """``{name: texts}`` from local files or ``datasets`` names (see ``kdistill.data.load_rows``)."""
    from kdistill.data import load_rows

    named = dict(sources) if isinstance(sources, Mapping) else {s: s for s in sources}
    sets = {name: eval_texts_from_rows(load_rows(src)) for name, src in named.items()}
    for name, texts in sets.items():
        if not texts:  # decontaminating against nothing would pass everything without a word
            raise DataError(f"evaluation set {named[name]}: no text to decontaminate against (its rows hold no "
                            "non-empty strings)")
    return sets


# --------------------------------------------------------------------------------------------
# Example-level filtering
# --------------------------------------------------------------------------------------------


@dataclass
class ExampleFilter:
    """Instance-level filters over ``{"instruction", "input", "output", "finish_reason"}`` rows,
    applied in order; ``counts`` holds how many each filter dropped."""

    config: FilterConfig = field(default_factory=FilterConfig)
    decontaminator: Decontaminator | None = None
    counts: Counter[str] = field(default_factory=Counter)
    contaminated_by: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._seen: set[str] = set()
        c = self.config
        self._dedup = (
            MinHashDeduplicator(c.near_dup_threshold, c.minhash_perm, c.shingle_size)
            if c.near_dup_threshold is not None
            else None
        )

    def reason(self, row: Mapping[str, Any]) -> str | None:
        """The filter that drops ``row``, or ``None`` (``row`` is then remembered for the duplicate checks)."""
        c = self.config
        inp, out = str(row.get("input", "")).strip(), str(row.get("output", "")).strip()
        if c.drop_empty and (not out or out == inp):
            return "empty_output"
        if c.drop_truncated and row.get("finish_reason") == "length":
            return "truncated"
        text = f"{row.get('instruction', '')}\n{inp}\n{out}"
        if c.exact_dedup:
            key = normalise(text)
            if key in self._seen:
                return "exact_duplicate"
        if self.decontaminator is not None:
            name = self.decontaminator.match(text)
            if name is not None:
                self.contaminated_by[name] += 1
                return "contaminated"
        if self._dedup is not None and self._dedup.add(text, part=f"{inp}\n{out}") is not None:
            return "near_duplicate"
        if c.exact_dedup:
            self._seen.add(key)
        return None

    def keep(self, row: Mapping[str, Any]) -> bool:
        """True if ``row`` passes; otherwise its filter's count goes up."""
        why = self.reason(row)
        if why is not None:
            self.counts[why] += 1
        return why is None


def instruction_reason(text: str, config: FilterConfig, blocklist: KeywordBlocklist | None = None) -> str | None:
    """The first instruction-level filter (``length``, ``keywords``, ``bad_start``) dropping ``text``."""
    if not length_ok(text, config.min_words, config.max_words):
        return "length"
    if (blocklist or KeywordBlocklist(config.blocklist)).find(text) is not None:
        return "keywords"
    if config.drop_bad_start and bad_start(text):
        return "bad_start"
    return None
