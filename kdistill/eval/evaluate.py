"""``kdistill evaluate``: a student against its teacher on held-out data: size, speed, quality, a report.

:func:`evaluate_run` reads a run directory of ``kdistill distill`` (``recipe.yaml``, ``student/``,
``summary.json``, ``metrics.jsonl``): the teacher is the recipe's ``teachers[0].model``, the
held-out data the recipe's validation split (or the same ``validation_fraction`` split of the
training rows, with the run's seed), encoded as in training. :func:`evaluate_pair` compares any
two model references on given rows. Both return the metrics dict that
:func:`kdistill.eval.report.write_report` turns into ``report/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from kdistill.data import CausalLMFormat, ClassificationFormat, Collator, MaskedLMFormat, infer_labels, load_rows
from kdistill.data.instruction import InstructionFormat, alpaca_prompt
from kdistill.devices import check_device
from kdistill.errors import ConfigError, DataError
from kdistill.eval.quality import (
    check_classifiers,
    classification_quality,
    generation_quality,
    label_names,
    lm_comparison,
    lm_quality,
)
from kdistill.eval.report import headline, load_curves, write_report
from kdistill.eval.size import model_size
from kdistill.eval.speed import measure_speeds
from kdistill.models.resolve import load_model, load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)

TASKS = ("classification", "mlm", "causal")
_ALIASES = {"masked_lm": "mlm", "causal_lm": "causal", "clm": "causal"}
SPEED_ROWS = 64  # rows whose texts feed the speed measurement


@dataclass(frozen=True)
class DataColumns:
    """How held-out rows are read and encoded (the recipe's ``data`` fields of the same names)."""

    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None
    format: str = "text"  # causal LMs: "text" or "instruction"
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    template: str = "alpaca"
    max_length: int = 128
    mlm_probability: float = 0.15

    @classmethod
    def from_recipe(cls, data) -> DataColumns:
        return cls(**{f: getattr(data, f) for f in cls.__dataclass_fields__})


def _task(task: str) -> str:
    task = _ALIASES.get(task, task)
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of {', '.join(TASKS)}")
    return task


def _lm_format(task: str, cols: DataColumns):
    if cols.format == "instruction":
        return InstructionFormat(cols.instruction_column, cols.input_column, cols.output_column, cols.template,
                                 cols.max_length)
    if task == "mlm":
        return MaskedLMFormat(cols.text_column, cols.max_length)
    return CausalLMFormat(cols.text_column, cols.max_length)


def _width(model) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def _speed_texts(rows: list[dict], cols: DataColumns) -> tuple[list[str], list[str] | None]:
    rows = rows[:SPEED_ROWS]
    if cols.format == "instruction":
        return [alpaca_prompt(str(r.get(cols.instruction_column, "")), str(r.get(cols.input_column) or ""))
                + str(r.get(cols.output_column, "")) for r in rows], None
    texts = [str(r.get(cols.text_column, "")) for r in rows]
    pairs = [str(r.get(cols.text_pair_column, "")) for r in rows] if cols.text_pair_column else None
    return texts, pairs


def _prompts(tokenizer, rows: list[dict], cols: DataColumns, max_length: int) -> list[list[int]]:
    """Instruction prompts tokenized exactly as in training (template, specials), the last
    ``max_length`` tokens kept."""
    fmt = _lm_format("causal", cols)
    out = []
    for r in rows:
        prompt, _ = fmt._prompt_and_response(tokenizer, str(r[cols.instruction_column]),
                                             str(r.get(cols.input_column) or ""), "")
        out.append(prompt[-max_length:])
    return out


def _pair_id(*parts: str) -> str:
    return "pair:" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def evaluate_pair(teacher_ref: str, student_ref: str, task: str, rows: list[dict] | list[str], *,
                  columns: DataColumns | None = None, head_labels: list[str] | None = None, batch_size: int = 16,
                  repeats: int = 5, warmup: int = 1, new_tokens: int = 16, max_generate: int = 32,
                  max_new_tokens: int = 64, speed: bool = True, device: str | None = None, source: str = "data",
                  row_numbers: list[int] | None = None, run: str | None = None, trust_remote_code: bool = False,
                  seed: int = 0) -> dict:
    """Size, speed and quality of ``student_ref`` against ``teacher_ref`` on held-out ``rows``.

    ``rows``: dicts with the ``columns`` (or plain strings, taken as the text column); errors name
    ``source`` and the row's number there (``row_numbers``, default position + 1).
    ``head_labels``: label names given to both classification heads at load (as in training);
    without them each checkpoint's head is used as saved, and rows' labels map to the teacher's
    label names (or are class indices). ``batch_size``: the larger batch of the speed measurement
    and the evaluation batch. ``max_generate``: instruction rows whose greedy generations are
    scored with ROUGE-L (``max_new_tokens`` each). ``speed=False`` skips timing.
    Returns the metrics dict of a report (see :mod:`kdistill.eval.report`).
    """
    task = _task(task)
    cols = columns or DataColumns()
    if rows and isinstance(rows[0], str):
        rows = [{cols.text_column: r} for r in rows]
    if not rows:
        raise DataError(f"{source}: no held-out rows to evaluate on")
    if cols.format == "instruction" and task != "causal":
        raise ConfigError(f"instruction data needs task causal, not {task}")
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ConfigError(f"--batch-size and --repeats must be ≥ 1 and --warmup ≥ 0 "
                          f"(got {batch_size}, {repeats}, {warmup})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from kdistill.distill.pipeline import _quiet_transformers

    _quiet_transformers()
    refs = {"teacher": teacher_ref, "student": student_ref}
    tokenizers = {k: load_tokenizer(r, trust_remote_code=trust_remote_code) for k, r in refs.items()}
    head = {"labels": head_labels} if task == "classification" and head_labels else {}
    models = {k: load_model(r, task, trust_remote_code=trust_remote_code, trained=True, **head).to(device).eval()
              for k, r in refs.items()}
    teacher, student = models["teacher"], models["student"]

    quality: dict
    if task == "classification":
        check_classifiers(teacher, student)
        names = head_labels or cols.labels or label_names(teacher)  # None: rows' labels are class indices
        if names is not None and len(names) != teacher.config.num_labels:
            raise ConfigError(f"{len(names)} label names ({', '.join(map(str, names))}) for heads of "
                              f"{teacher.config.num_labels} classes: give one name per class, in the heads' order")
        encoded = {}
        for k in refs:
            fmt = ClassificationFormat(cols.text_column, cols.text_pair_column, cols.label_column, names,
                                       cols.max_length)
            encoded[k] = (fmt.encode(rows, tokenizers[k], source_name=source, row_numbers=row_numbers),
                          Collator(tokenizers[k], task))
        quality = classification_quality(teacher, student, encoded, batch_size=batch_size, device=device)
        n_examples = quality["vs_teacher"]["examples"]
    else:
        vocab_map, vocab_size = lm_comparison(tokenizers["teacher"], tokenizers["student"],
                                              _local_dir(student_ref), _width(teacher), _width(student))
        examples = _lm_format(task, cols).encode(rows, tokenizers["teacher"], source_name=source,
                                                  row_numbers=row_numbers)
        collator = Collator(tokenizers["teacher"], task, mlm_probability=cols.mlm_probability)
        quality = lm_quality(teacher, student, task, examples, collator, vocab_map=vocab_map, vocab_size=vocab_size,
                             batch_size=batch_size, device=device, seed=seed)
        n_examples = len(examples)
        if cols.format == "instruction" and max_generate > 0:
            chosen = rows[:max_generate]
            generated = generation_quality(
                {k: (models[k], tokenizers[k]) for k in refs},
                {k: _prompts(tokenizers[k], chosen, cols, cols.max_length) for k in refs},
                [str(r[cols.output_column]) for r in chosen], max_new_tokens=max_new_tokens,
                batch_size=batch_size, device=device)
            for k in refs:
                quality[k]["rouge_l"] = generated[k]["rouge_l"]
                quality[k]["rouge_l_examples"] = generated[k]["examples"]
                quality[k]["samples"] = generated[k]["samples"]
            quality["rouge_scorer"] = generated["scorer"]

    speeds: dict = {}
    if speed:
        texts, pairs = _speed_texts(rows, cols)
        speeds = measure_speeds({k: (models[k], tokenizers[k]) for k in refs}, texts, task, pairs=pairs,
                                batch_size=batch_size, max_length=cols.max_length, new_tokens=new_tokens,
                                warmup=warmup, repeats=repeats, device=device)
    out_models: dict = {}
    for k, ref in refs.items():
        entry: dict = {"role": k, "ref": ref, "size": model_size(models[k], _local_dir(ref)),
                       "quality": quality[k]}
        if speed:
            entry["speed"] = speeds[k]
        if k == "student":
            entry["vs_teacher"] = quality["vs_teacher"]
        out_models[k] = entry

    metric = "accuracy" if task == "classification" else (
        "rouge_l" if "rouge_l" in quality["student"] else "perplexity")
    metrics = {
        "run": run or _pair_id(teacher_ref, student_ref, task, source),
        "name": Path(student_ref).name if run is None else None,
        "task": task,
        "data_format": cols.format,
        "primary_metric": {"name": metric, "lower_is_better": metric == "perplexity"},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {"source": source, "rows": len(rows), "examples": n_examples},
        "settings": {"batch_size": batch_size, "repeats": repeats, "warmup": warmup, "new_tokens": new_tokens,
                     "max_length": cols.max_length, "device": str(device), "torch": torch.__version__,
                     **({"rouge_scorer": quality["rouge_scorer"]} if "rouge_scorer" in quality else {})},
        "models": out_models,
    }
    metrics["headline"] = headline(metrics)
    return metrics


def _local_dir(ref: str) -> str | None:
    try:
        return resolve_model_path(ref)
    except Exception:  # an alias whose package is missing was already reported by load_model
        return None


# ---------------------------------------------------------------------------- run directories


def _run_rows(recipe, data: str | Path | None) -> tuple[list[dict], str, list[str] | None, list[int] | None]:
    """(held-out rows, their source name, the class names the student was trained with (classification),
    the held-out rows' numbers in that source when they are not 1, 2, ...).

    The recipe's own validation split and class names come from ``_split_rows``, as in ``distill``."""
    from kdistill.distill.pipeline import _rows, _split_rows

    spec = recipe.data
    if data is None and spec.validation is None and spec.validation_fraction <= 0:
        raise ConfigError(f"recipe {recipe.name!r} has no validation split (data.validation or "
                          "data.validation_fraction); pass --data FILE")
    if data is None and spec.validation is None:
        split = _split_rows(recipe)
        return (split.validation, f"{spec.train.source} (validation_fraction {spec.validation_fraction:g})",
                split.labels, split.validation_numbers)
    if data is not None:
        rows, source = load_rows(str(data), text_column=spec.text_column), str(data)
    else:
        rows, source = _rows(spec.validation, spec.text_column), spec.validation.source
    labels = None
    if recipe.task == "classification":
        labels = spec.labels or infer_labels(_rows(spec.train, spec.text_column), spec.label_column,
                                             source_name=spec.train.source)
    return rows, source, labels, None


def evaluate_run(run_dir: str | Path, *, data: str | Path | None = None, teacher: str | None = None,
                 batch_size: int = 16, repeats: int = 5, warmup: int = 1, new_tokens: int = 16,
                 max_generate: int = 32, max_new_tokens: int = 64, speed: bool = True, device: str | None = None,
                 out_dir: str | Path | None = None, force: bool = False, write: bool = True) -> dict:
    """Evaluate the student of a finished run against its teacher and write ``report/``.

    ``data``: a held-out file instead of the recipe's validation split; ``teacher``: a model
    reference instead of the recipe's first teacher; ``out_dir``: where ``report/`` goes (default
    the run directory). Returns the metrics with ``headline`` and ``report`` (file paths) added.
    """
    from kdistill.recipe import load_recipe

    run_dir = Path(run_dir)
    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory of kdistill distill: no recipe.yaml")
    if not (run_dir / "student" / "config.json").is_file():
        raise ConfigError(f"{run_dir} has no exported student (student/config.json): has the run finished?")
    recipe = load_recipe(recipe_path)
    teacher_ref = teacher or (recipe.teachers[0].model if recipe.teachers else None)
    if teacher_ref is None:
        raise ConfigError(f"recipe {recipe.name!r} has no teacher; pass --teacher REF to compare against")
    rows, source, labels, row_numbers = _run_rows(recipe, data)
    run_id = f"{recipe.name}@{hashlib.sha256(recipe_path.read_bytes()).hexdigest()[:12]}"
    metrics = evaluate_pair(teacher_ref, str(run_dir / "student"), recipe.task, rows,
                            columns=DataColumns.from_recipe(recipe.data), head_labels=labels, batch_size=batch_size,
                            repeats=repeats, warmup=warmup, new_tokens=new_tokens, max_generate=max_generate,
                            max_new_tokens=max_new_tokens, speed=speed, device=device, source=source,
                            row_numbers=row_numbers, run=run_id,
                            trust_remote_code=recipe.trust_remote_code, seed=recipe.training.seed)
    metrics["name"] = recipe.name
    metrics["run_dir"] = str(run_dir)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        metrics["training"] = {k: summary[k] for k in ("steps", "train_seconds", "best_step", "best_metric",
                                                       "stopped_early", "final_eval", "processes") if k in summary}
    if write:
        paths = write_report(out_dir if out_dir is not None else run_dir, metrics, run_dir / "metrics.jsonl",
                             force=force)
        metrics["report"] = {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in paths.items()}
    return metrics


# ---------------------------------------------------------------------------- command line


def format_table(metrics: dict) -> str:
    """A small plain-text table: one column per model, one row per number."""
    models = metrics["models"]
    metric_keys = [k for k in ("accuracy", "macro_f1", "ece", "perplexity", "rouge_l")
                   if any(k in (m.get("quality") or {}) for m in models.values())]

    def num(x, fmt="{:.4g}"):
        return "–" if x is None else fmt.format(x)

    def mib(x):
        return "–" if x is None else f"{x / 2**20:.1f} MiB"

    lines = [("", *models.keys())]
    lines.append(("parameters", *[f"{m['size']['parameters']['total']:,}" for m in models.values()]))
    lines.append(("weights on disk", *[mib(m["size"].get("file_bytes")) for m in models.values()]))
    if all(m.get("speed") for m in models.values()):
        unit = next(iter(models.values()))["speed"]["throughput_unit"]
        lines.append(("latency b=1 (ms)", *[num(m["speed"]["latency_ms"]) for m in models.values()]))
        lines.append((f"throughput ({unit})", *[num(m["speed"]["throughput"]) for m in models.values()]))
        lines.append(("peak memory", *[mib(m["speed"].get("peak_memory_bytes")) for m in models.values()]))
    for k in metric_keys:
        lines.append((k, *[num((m.get("quality") or {}).get(k)) for m in models.values()]))
    for k in ("kl", "agreement"):
        lines.append((f"{k} vs teacher", *[num((m.get("vs_teacher") or {}).get(k)) if m.get("vs_teacher") else ""
                                           for m in models.values()]))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
                               enumerate(zip(row, widths))).rstrip() for row in lines)


def _slug(ref: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(ref.rstrip("/")).name or ref).strip("-") or "student"


# how to read --data when no run's recipe says it
_DATA_OPTIONS = ("text_column", "text_pair_column", "label_column", "labels", "format", "max_length")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be ≥ 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    generation = {n: getattr(args, n) for n in ("max_generate", "max_new_tokens") if getattr(args, n) is not None}
    common = dict(batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens,
                  speed=not args.no_speed, device=check_device(args.device), **generation)
    if args.run_dir is not None:
        given = [f"--{n.replace('_', '-')}" for n in ("student", "task") + _DATA_OPTIONS if getattr(args, n) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: without RUN_DIR only (the run's recipe names its student, task "
                              "and data columns)")
        metrics = evaluate_run(args.run_dir, data=args.data, teacher=args.teacher, out_dir=args.out, force=args.force,
                               **common)
    else:
        missing = [f"--{n}" for n in ("teacher", "student", "task", "data") if getattr(args, n) is None]
        if missing:
            raise ConfigError(f"give RUN_DIR, or all of --teacher, --student, --task and --data (missing "
                              f"{', '.join(missing)})")
        given = {n: getattr(args, n) for n in _DATA_OPTIONS if getattr(args, n) is not None}
        for options, applies, needs in (
                (("labels", "text_pair_column", "label_column"), args.task == "classification", "--task classification"),
                (tuple(generation), args.format == "instruction", "--format instruction")):
            ignored = [f"--{n.replace('_', '-')}" for n in options if n in given or n in generation]
            if ignored and not applies:
                raise ConfigError(f"{', '.join(ignored)}: for {needs} only (they would have no effect)")
        if "labels" in given:
            given["labels"] = [x.strip() for x in given["labels"].split(",")]
        cols = DataColumns(**given)  # its defaults for the rest
        rows = load_rows(args.data, text_column=cols.text_column)
        metrics = evaluate_pair(args.teacher, args.student, args.task, rows, columns=cols, source=args.data, **common)
        out = Path(args.out) if args.out else Path("runs") / f"eval-{_slug(args.student)}"
        paths = write_report(out, metrics, None, force=args.force)
        metrics["report"] = {"html": str(paths["html"]), "markdown": str(paths["markdown"]),
                             "dir": str(paths["dir"])}
    print(format_table(metrics))
    print()
    print(metrics["headline"]["text"])
    print(f"report: {metrics['report']['html']} (and report.md, metrics.json in {metrics['report']['dir']})")


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``kdistill evaluate`` to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "evaluate", help="compare a student with its teacher (size, speed, quality) and write a report",
        description="kdistill evaluate RUN_DIR, or kdistill evaluate --teacher REF --student REF --task T "
                    "--data FILE: parameters, size on disk, latency/throughput/peak memory, task quality, "
                    "student-vs-teacher agreement; writes report/{metrics.json,report.md,report.html}.")
    p.add_argument("run_dir", nargs="?", help="a run directory of kdistill distill (recipe.yaml, student/)")
    p.add_argument("--teacher", help="teacher model reference (overrides the run's first teacher)")
    p.add_argument("--student", help="student model reference (without RUN_DIR)")
    p.add_argument("--task", choices=TASKS, help="classification, mlm or causal (without RUN_DIR)")
    p.add_argument("--data", help="held-out data file (with RUN_DIR: instead of the recipe's validation split)")
    p.add_argument("--text-column", help="without RUN_DIR (default text)")
    p.add_argument("--text-pair-column", help="without RUN_DIR")
    p.add_argument("--label-column", help="without RUN_DIR (default label)")
    p.add_argument("--labels", help="without RUN_DIR: comma-separated label names, in the heads' order")
    p.add_argument("--format", choices=("text", "instruction"),
                   help="without RUN_DIR, causal LMs: raw text (default) or instruction/input/output rows "
                        "(ROUGE-L of greedy outputs)")
    p.add_argument("--max-length", type=int, help="without RUN_DIR: tokens per example (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch and the larger speed batch")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions; medians reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first (default 1)")
    p.add_argument("--new-tokens", type=int, default=16, help="causal LMs: decode steps timed (default 16)")
    p.add_argument("--max-generate", type=int, help="instruction rows scored with ROUGE-L (default 32)")
    p.add_argument("--max-new-tokens", type=int, help="generation length for ROUGE-L (default 64)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-speed", action="store_true", help="skip the timing")
    p.add_argument("--out", help="directory for report/ (default: the run directory, or runs/eval-<student>)")
    p.add_argument("--force", action="store_true", help="overwrite a report of another run")
    p.set_defaults(func=_cmd_evaluate)
    return p


__all__ = ["DataColumns", "evaluate_pair", "evaluate_run", "format_table", "load_curves", "register_cli"]
