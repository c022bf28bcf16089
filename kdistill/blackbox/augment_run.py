"""``kdistill augment``: a recipe's GPT3Mix stage, from its real training rows to synthetic rows + data card.

Writes ``runs/<name>/data/synthetic.jsonl`` (see :mod:`kdistill.blackbox.gptmix`),
``data/teacher_calls.sqlite`` (every request and answer, so a rerun costs nothing) and
``data/data_card.{md,json}``. ``kdistill distill`` on the same recipe then mixes the synthetic rows
into training at ``augment.ratio`` (soft-target CE for synthetic rows, hard labels for real ones).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from kdistill.blackbox.backends import Budget, BudgetExhausted, SamplingParams, TextTeacher
from kdistill.blackbox.cards import write_data_card
from kdistill.blackbox.gptmix import GPT3MixConfig, augment, build_prompt
from kdistill.data.formats import ClassificationFormat, _column, _text
from kdistill.errors import ConfigError, DataError, KdistillError
from kdistill.recipe import Recipe, TextTeacherSpec

log = logging.getLogger(__name__)


def teacher_licence(spec: TextTeacherSpec) -> str:
    """The licence that applies to a teacher's outputs, as far as kdistill knows it."""
    if spec.backend == "local":
        from kdistill.models.gemma import model_licence

        try:
            info = model_licence(spec.model)
        except (KdistillError, OSError):
            info = None
        if info:
            return f"{info.get('licence')} ({info.get('licence_url')})"
    return "unknown: check the teacher's terms of use before training on its outputs"


def make_text_teacher(spec: TextTeacherSpec, replay_path: Path | None) -> TextTeacher:
    """The teacher a recipe names, wrapped in record/replay when ``replay_path`` is given."""
    if spec.backend == "replay":
        from kdistill.blackbox.replay import ReplayTeacher

        return ReplayTeacher(None, spec.replay_file, "replay", name=spec.model)
    if spec.backend == "local":
        import torch

        from kdistill.blackbox.backends import LocalTeacher

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(spec.dtype or "")
        teacher: TextTeacher = LocalTeacher(spec.model, batch_size=spec.batch_size, dtype=dtype)
    else:
        from kdistill.blackbox.backends import OpenAITeacher

        teacher = OpenAITeacher(spec.model, spec.base_url, api_key_env=spec.api_key_env, chat=spec.chat,
                                max_concurrency=spec.max_concurrency,
                                budget=Budget(max_requests=spec.max_requests, max_tokens=spec.max_tokens))
    if replay_path is None:
        return teacher
    from kdistill.blackbox.replay import ReplayTeacher

    return ReplayTeacher(teacher, replay_path, "auto")


def synthetic_path(recipe: Recipe) -> Path:
    return recipe.run_dir / "data" / "synthetic.jsonl"


def run_augment(recipe: Recipe, progress: Callable[[int, int], None] | None = None) -> dict:
    """Generate the recipe's synthetic examples; return the counts written to the data card."""
    spec = recipe.augment
    if spec is None:
        raise ConfigError("the recipe has no augment: section (teacher, text_type, label_type, ...)")
    from kdistill.distill.pipeline import _split_rows

    split = _split_rows(recipe)  # exactly as kdistill distill splits the data
    labels = split.labels
    verbalizers = spec.verbalizers or labels
    if len(verbalizers) != len(labels):
        raise ConfigError(f"augment.verbalizers has {len(verbalizers)} names for {len(labels)} labels {labels}")
    classes = ClassificationFormat(labels=labels)  # labels read as kdistill distill reads them
    real = []
    for number, row in zip(split.train_numbers, split.train):
        where = f"{recipe.data.train.source} row {number}"
        real.append((_text(row, where, recipe.data.text_column),
                     classes.label_index(_column(row, where, recipe.data.label_column), where)))
    params = SamplingParams(max_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
                            stop=("\n",), seed=spec.seed)
    config = GPT3MixConfig(spec.text_type, spec.label_type, tuple(verbalizers), spec.k, spec.sampling,
                           spec.top_logprobs, spec.votes, params)
    out_dir = recipe.run_dir / "data"
    teacher = make_text_teacher(spec.teacher, out_dir / "teacher_calls.sqlite" if spec.teacher.replay else None)
    status, error = "complete", None
    try:
        stats = augment(teacher, real, config, synthetic_path(recipe), num_examples=spec.num_examples,
                        seed=spec.seed, batch_size=spec.teacher.batch_size, progress=progress)
    except BudgetExhausted as exc:
        status, error, stats = "stopped: budget exhausted", exc, None
    written = _count_rows(synthetic_path(recipe))
    counts = {"real_rows": len(real), "synthetic_rows": written, "target": spec.num_examples}
    if stats is not None:
        counts.update(prompts=stats.prompts, dropped_unparsable=stats.dropped_unparsable,
                      soft_label_source=stats.soft_label_source)
    write_data_card(out_dir, teacher_name=teacher.name, teacher_licence=teacher_licence(spec.teacher),
                    prompt_template=build_prompt(config, [("<text>", 0), ("<text>", 1)]), sampling_params=params,
                    budget={"max_requests": spec.teacher.max_requests, "max_tokens": spec.teacher.max_tokens},
                    counts=counts, seed_file_sha256=None, status=status,
                    extra={"method": "GPT3Mix (Yoo et al., 2021)", "k": spec.k, "sampling": spec.sampling})
    if error is not None:
        raise BudgetExhausted(f"augment: the teacher's budget ran out after {written} of {spec.num_examples} "
                              f"synthetic rows ({error}); they are kept in {synthetic_path(recipe)}")
    if written == 0:
        raise DataError(f"augment: every one of the teacher's {stats.prompts} outputs was unparsable; "
                        f"see {out_dir / 'data_card.md'}")
    return counts


def _count_rows(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def synthetic_rows(recipe: Recipe, n_real: int, labels: list[str]) -> list[dict]:
    """Synthetic rows to add to training: ``ratio × n_real`` of them, labels as data label names."""
    spec = recipe.augment
    path = synthetic_path(recipe)
    if spec is None or spec.ratio == 0:
        return []
    if not path.exists():
        raise ConfigError(f"{path} does not exist: run `kdistill augment` on this recipe first")
    verbalizers = spec.verbalizers or labels
    wanted = round(spec.ratio * n_real)
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {i + 1}: invalid JSON ({error.msg})") from None
        missing = [key for key in ("text", "label", "probs") if not isinstance(row, dict) or key not in row]
        if missing:
            raise DataError(f"{path} line {i + 1}: missing field {missing[0]!r}")
        probs = row["probs"]
        if not isinstance(probs, list) or len(probs) != len(verbalizers):
            raise DataError(f"{path} line {i + 1}: probs must be a list of {len(verbalizers)} probabilities "
                            f"(one per label), got {probs!r}")
        if row["label"] not in verbalizers:
            raise DataError(f"{path} line {i + 1}: label {row['label']!r} is not one of {verbalizers}")
        rows.append({recipe.data.text_column: row["text"],
                     recipe.data.label_column: labels[verbalizers.index(row["label"])], "probs": row["probs"]})
        if len(rows) == wanted:
            break
    if len(rows) < wanted:
        log.warning("%s has %d synthetic rows; ratio %.2f asks for %d", path, len(rows), spec.ratio, wanted)
    return rows
