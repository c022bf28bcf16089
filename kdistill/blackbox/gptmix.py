"""GPT3Mix augmentation (Yoo et al., 2021): a text teacher writes new labelled examples, soft labels included.

The prompt names the text type, the label type and the label set, lists k real examples, and
leaves an open slot::

    Each item in the following list contains a movie review and the respective sentiment.
    The sentiment is one of 'negative' or 'positive'.
    Movie review: a gorgeous, witty film (Sentiment: positive)
    Movie review: it drags on and on (Sentiment: negative)
    Movie review:

The teacher completes one line: ``<new text> (Sentiment: <label>)``. The **soft label** is read
at the label position: p(label) ∝ Σ over the label's token variants (case, leading space) of
the probability of the variant's first token, from the returned top log-probs; several labels
sharing a first token are split by a scoring call (``max_tokens=1``) one token further. Where the
provider returns no log-probs (or no label is in the top-k), a scoring call over the label slot
is sampled ``votes`` times and the label frequencies are the soft label. Unparsable completions
are dropped and counted.

Output: JSONL rows ``{id, text, label, probs, source: "synthetic", prompt_examples, teacher}``,
appended as they are made, so a killed run continues without duplicates (row ids are
``<seed>-<n>``: the n-th prompt of the run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdistill.blackbox.backends import BudgetExhausted, Completion, SamplingParams, TextTeacher
from kdistill.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPT3MixConfig:
    """What the prompt says and how examples are drawn.

    text_type / label_type: e.g. "movie review" / "sentiment" (required: no silent fallback).
    labels: the label names as the teacher should write them (the verbalizers), in class order.
    k: real examples per prompt; sampling: ``uniform`` or ``balanced`` (round-robin over classes).
    """

    text_type: str
    label_type: str
    labels: tuple[str, ...]
    k: int = 4
    sampling: str = "balanced"
    top_logprobs: int = 10
    votes: int = 8
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=64, temperature=0.9,
                                                                          stop=("\n",)))

    def __post_init__(self) -> None:
        if not self.text_type.strip() or not self.label_type.strip():
            raise ConfigError("augment: text_type and label_type must be named (e.g. 'movie review', 'sentiment')")
        names = [label.strip() for label in self.labels]
        if len(names) < 2:
            raise ConfigError(f"augment.verbalizers (or the data labels): need at least two labels, got {list(self.labels)}")
        if any(not n for n in names):
            raise ConfigError("augment.verbalizers (or the data labels): a label is empty")
        lowered = [n.lower() for n in names]
        dupes = sorted({n for n in lowered if lowered.count(n) > 1})
        if dupes:
            raise ConfigError(f"augment.verbalizers (or the data labels): duplicate label {dupes[0]!r}")
        if self.k < 1:
            raise ConfigError(f"augment.k must be ≥ 1, got {self.k}")
        if self.sampling not in ("uniform", "balanced"):
            raise ConfigError(f"augment.sampling must be 'uniform' or 'balanced', got {self.sampling!r}")


def _quote(labels: Sequence[str]) -> str:
    quoted = [f"'{label}'" for label in labels]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def build_prompt(config: GPT3MixConfig, examples: Sequence[tuple[str, int]]) -> str:
    """The GPT3Mix prompt for ``examples`` ((text, class index) pairs), ending at the open slot."""
    text_type = config.text_type[0].upper() + config.text_type[1:]
    label_type = config.label_type[0].upper() + config.label_type[1:]
    lines = [f"Each item in the following list contains a {config.text_type} and the respective "
             f"{config.label_type}. The {config.label_type} is one of {_quote(config.labels)}."]
    for text, label in examples:
        lines.append(f"{text_type}: {' '.join(text.split())} ({label_type}: {config.labels[label]})")
    lines.append(f"{text_type}:")
    return "\n".join(lines)


def sample_examples(real: Sequence[tuple[str, int]], config: GPT3MixConfig, rng: random.Random) -> list[int]:
    """Indices of k real examples: uniform, or balanced (classes in turn, shuffled)."""
    if config.k > len(real):
        raise ConfigError(f"augment.k = {config.k} is larger than the {len(real)} real examples available")
    if config.sampling == "uniform":
        return rng.sample(range(len(real)), config.k)
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(real):
        by_class.setdefault(label, []).append(i)
    pools = [rng.sample(ids, len(ids)) for _, ids in sorted(by_class.items())]
    rng.shuffle(pools)
    chosen: list[int] = []
    while len(chosen) < config.k:
        for pool in pools:
            if pool and len(chosen) < config.k:
                chosen.append(pool.pop())
    rng.shuffle(chosen)
    return chosen


# ------------------------------------------------------------------------------ parsing and soft labels


@dataclass
class Parsed:
    text: str
    label: int
    label_char: int  # where the label starts in the completion text


def parse_completion(text: str, config: GPT3MixConfig) -> Parsed | None:
    """``<text> (<Label type>: <label>)`` → (text, class, label offset); None if it does not parse."""
    pattern = re.compile(r"^\s*(?P<text>.+?)\s*\(\s*" + re.escape(config.label_type) + r"\s*:\s*(?P<label>[^)]*?)\s*\)?\s*$",
                         re.IGNORECASE | re.DOTALL)
    match = pattern.match(text)
    if not match:
        return None
    written = match.group("label").strip().lower()
    label = next((i for i, name in enumerate(config.labels) if name.strip().lower() == written), None)
    body = match.group("text").strip()
    if label is None or not body:
        return None
    return Parsed(body, label, match.start("label"))


def _token_position(completion: Completion, char: int) -> int | None:
    """Index of the generated token that covers character ``char`` of the completion text."""
    offset = 0
    for i, token in enumerate(completion.tokens):
        if offset + len(token) > char:
            return i
        offset += len(token)
    return None


def _matches(token: str, label: str) -> bool:
    piece = token.strip().lower()
    return bool(piece) and label.strip().lower().startswith(piece)


def label_mass(top: dict[str, float], labels: Sequence[str]) -> list[float] | None:
    """Per label, the summed probability of top tokens that begin it; None when a token is ambiguous.

    A token counts for a label if, stripped and lower-cased, it is a prefix of the label
    (covers case variants and the leading-space variant of the same word).
    """
    mass = [0.0] * len(labels)
    for token, logprob in top.items():
        hits = [i for i, label in enumerate(labels) if _matches(token, label)]
        if len(hits) > 1:
            return None
        if hits:
            mass[hits[0]] += math.exp(logprob)
    return mass


def soft_label(
    teacher: TextTeacher, prompt: str, completion: Completion, parsed: Parsed, config: GPT3MixConfig
) -> tuple[list[float], str]:
    """Soft label over ``config.labels`` and how it was obtained (logprobs | scoring | vote)."""
    labels = list(config.labels)
    prefix = prompt + completion.text[: parsed.label_char]
    position = _token_position(completion, parsed.label_char)
    if completion.top_logprobs is not None and position is not None and position < len(completion.top_logprobs):
        mass = label_mass(completion.top_logprobs[position], labels)
        if mass is not None and sum(mass) > 0:
            return [m / sum(mass) for m in mass], "logprobs"
    scoring = SamplingParams(max_tokens=1, temperature=1.0, seed=config.params.seed)
    [[scored]] = teacher.complete([prefix], scoring, n=1, logprobs=config.top_logprobs)
    if scored.top_logprobs:
        mass = label_mass(scored.top_logprobs[0], labels)
        if mass is not None and sum(mass) > 0:
            return [m / sum(mass) for m in mass], "scoring"
    vote_params = SamplingParams(max_tokens=8, temperature=1.0, stop=(")", "\n"), seed=config.params.seed)
    [samples] = teacher.complete([prefix], vote_params, n=config.votes)
    counts = [0] * len(labels)
    for sample in samples:
        written = sample.text.strip().lower()
        hit = next((i for i, name in enumerate(labels) if written.startswith(name.strip().lower())), None)
        if hit is not None:
            counts[hit] += 1
    if sum(counts) == 0:
        counts[parsed.label] = 1
    return [c / sum(counts) for c in counts], "vote"


# ------------------------------------------------------------------------------ the augmentation run


@dataclass
class AugmentStats:
    prompts: int = 0
    kept: int = 0
    dropped_unparsable: int = 0
    soft_label_source: dict[str, int] = field(default_factory=dict)
    stopped_by_budget: bool = False


def _row_id(seed: int, n: int) -> str:
    return f"{seed}-{n}"


def augment(
    teacher: TextTeacher,
    real: Sequence[tuple[str, int]],
    config: GPT3MixConfig,
    output: Path,
    *,
    num_examples: int,
    seed: int = 0,
    batch_size: int = 8,
    max_prompts: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AugmentStats:
    """Append synthetic rows to ``output`` (JSONL) until it holds ``num_examples`` of this seed.

    Resumable: rows already in ``output`` count, prompt numbering continues after them, so a
    rerun after a kill neither repeats nor loses rows. ``max_prompts`` bounds the attempts
    (default: 4 × num_examples). Budget exhaustion keeps everything written and re-raises.
    """
    if not real:
        raise DataError("augment: no real examples to put in the prompts")
    output.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in output.read_text().splitlines() if line.strip()] if output.exists() else []
    mine = [row for row in done if row["id"].split("-")[0] == str(seed)]
    attempts = max((int(row["id"].split("-")[1]) + 1 for row in mine), default=0)
    attempts = max(attempts, _attempts_logged(output, seed))
    stats = AugmentStats(kept=len(mine))
    max_prompts = max_prompts or 4 * num_examples
    while stats.kept < num_examples and attempts < max_prompts:
        batch_ids = list(range(attempts, min(attempts + batch_size, max_prompts)))
        prompts, chosen = [], []
        for n in batch_ids:
            rng = random.Random(f"{seed}-{n}")
            picked = sample_examples(real, config, rng)
            chosen.append(picked)
            prompts.append(build_prompt(config, [real[i] for i in picked]))
        params = SamplingParams(**{**asdict(config.params), "seed": None if config.params.seed is None
                                   else config.params.seed + attempts})
        try:
            completions = teacher.complete(prompts, params, n=1, logprobs=config.top_logprobs)
        except BudgetExhausted as error:
            stats.stopped_by_budget = True
            got = [i for i, c in enumerate(error.partial or []) if c is not None]
            _write_rows(output, teacher, config, seed, [prompts[i] for i in got], [chosen[i] for i in got],
                        [batch_ids[i] for i in got], [error.partial[i] for i in got], stats, num_examples)
            _log_attempts(output, seed, batch_ids[got[-1]] + 1 if got else attempts)
            raise
        _write_rows(output, teacher, config, seed, prompts, chosen, batch_ids, completions, stats, num_examples)
        attempts = batch_ids[-1] + 1
        _log_attempts(output, seed, attempts)
        if progress is not None:
            progress(stats.kept, num_examples)
    stats.prompts = attempts
    return stats


def _write_rows(output: Path, teacher: TextTeacher, config: GPT3MixConfig, seed: int, prompts: list[str],
                chosen: list[list[int]], batch_ids: list[int], completions: list[list[Completion]],
                stats: AugmentStats, num_examples: int) -> None:
    """Parse, soft-label and append one batch of completions (one line per kept row)."""
    with output.open("a") as f:
        for prompt, picked, n, [completion] in zip(prompts, chosen, batch_ids, completions):
            if stats.kept >= num_examples:
                break
            parsed = parse_completion(completion.text, config)
            if parsed is None:
                stats.dropped_unparsable += 1
                continue
            probs, source = soft_label(teacher, prompt, completion, parsed, config)
            stats.soft_label_source[source] = stats.soft_label_source.get(source, 0) + 1
            row = {"id": _row_id(seed, n), "text": parsed.text, "label": config.labels[parsed.label],
                   "probs": probs, "source": "synthetic", "prompt_examples": picked, "teacher": teacher.name,
                   "soft_label_from": source}
            f.write(json.dumps(row) + "\n")
            f.flush()
            stats.kept += 1


def _attempts_path(output: Path) -> Path:
    return output.with_name(output.name + ".attempts.json")


def _attempts_logged(output: Path, seed: int) -> int:
    path = _attempts_path(output)
    return json.loads(path.read_text()).get(str(seed), 0) if path.exists() else 0


def _log_attempts(output: Path, seed: int, attempts: int) -> None:
    path = _attempts_path(output)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[str(seed)] = attempts
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def prompt_template_hash(config: GPT3MixConfig) -> str:
    """A short hash of the prompt template (for the data card)."""
    return hashlib.sha256(build_prompt(config, [("<text>", 0)]).encode()).hexdigest()[:16]
