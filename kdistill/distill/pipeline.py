"""``kdistill distill``: from a validated recipe to a trained, exported student in the run directory.

Writes ``recipe.yaml`` (the validated recipe, every default filled in), ``metrics.jsonl``,
``checkpoints/``, ``student/`` (loads with ``AutoModel*.from_pretrained`` and ``AutoTokenizer``)
and ``summary.json`` (sizes, final evaluation, steps, time).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from accelerate import Accelerator

from kdistill.data import CausalLMFormat, ClassificationFormat, Collator, MaskedLMFormat, infer_labels, load_rows
from kdistill.data.instruction import InstructionFormat
from kdistill.data.sources import split_rows
from kdistill.distill.distiller import _family
from kdistill.distill.trainer import TrainJob, TrainResult, make_accelerator, train
from kdistill.errors import ConfigError
from kdistill.models.layers import find_layer_stack, select_layers
from kdistill.models.resolve import load_model, load_tokenizer
from kdistill.models.student import count_parameters, student_from_teacher
from kdistill.recipe import Recipe, SplitSpec, dump_recipe
from kdistill.signals.live import LiveTeachers

log = logging.getLogger(__name__)


def _rows(split: SplitSpec, text_column: str) -> list[dict]:
    rows = load_rows(split.source, format=split.format, split=split.split, config_name=split.config_name,
                     text_column=text_column)
    return rows[: split.limit] if split.limit else rows


def _format(recipe: Recipe, labels: list[str] | None):
    data = recipe.data
    if recipe.task == "classification":
        return ClassificationFormat(data.text_column, data.text_pair_column, data.label_column, labels,
                                    data.max_length)
    if recipe.task == "mlm":
        return MaskedLMFormat(data.text_column, data.max_length)
    if data.format == "instruction":
        return InstructionFormat(data.instruction_column, data.input_column, data.output_column, data.template,
                                 data.max_length)
    return CausalLMFormat(data.text_column, data.max_length)


def _same_vocabulary(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def build_job(recipe: Recipe) -> tuple[TrainJob, object, dict]:
    """Load data, teachers and student for ``recipe``; return the job, the tokenizer and sizes."""
    data = recipe.data
    train_rows = _rows(data.train, data.text_column)
    if data.validation is not None:
        eval_rows = _rows(data.validation, data.text_column)
    elif data.validation_fraction > 0:
        train_rows, eval_rows = split_rows(train_rows, validation_fraction=data.validation_fraction,
                                           seed=recipe.training.seed)
    else:
        eval_rows = []
    labels = None
    if recipe.task == "classification":
        labels = data.labels or infer_labels(train_rows, data.label_column, source_name=data.train.source)
    if recipe.augment is not None:
        from kdistill.blackbox.augment_run import synthetic_rows

        train_rows = train_rows + synthetic_rows(recipe, len(train_rows), labels)
    head_kwargs = {"labels": labels} if recipe.task == "classification" else {}

    teacher_models = [load_model(t.model, recipe.task, trust_remote_code=recipe.trust_remote_code, **head_kwargs)
                      for t in recipe.teachers]
    spec = recipe.student
    if spec.init_from_teacher is not None:
        init = spec.init_from_teacher
        _, stack = find_layer_stack(teacher_models[0])
        layers = select_layers(len(stack), init.strategy, init.num_layers, init.layers)
        student = student_from_teacher(teacher_models[0], layers)
        tokenizer = load_tokenizer(recipe.teachers[0].model, trust_remote_code=recipe.trust_remote_code)
        log.info("student = teacher layers %s", layers)
    else:
        student = load_model(spec.model, recipe.task, trust_remote_code=recipe.trust_remote_code, **head_kwargs)
        tokenizer = load_tokenizer(spec.model, trust_remote_code=recipe.trust_remote_code)

    needs_same_vocab = any(_family(t.kind) == "response" and t.kind != "ce" for t in recipe.objective)
    vocab_size = None
    if needs_same_vocab and recipe.task != "classification":
        for t_spec in recipe.teachers:
            if not _same_vocabulary(load_tokenizer(t_spec.model, trust_remote_code=recipe.trust_remote_code),
                                    tokenizer):
                raise ConfigError(f"teacher {t_spec.model!r} and the student use different tokenizers; response "
                                  "terms compare distributions over one vocabulary")
        widths = {m.get_output_embeddings().weight.shape[0] for m in [student, *teacher_models]
                  if m.get_output_embeddings() is not None}
        if len(widths) > 1:
            vocab_size = len(tokenizer)

    fmt = _format(recipe, labels)
    train_examples = fmt.encode(train_rows, tokenizer, source_name=data.train.source)
    eval_examples = fmt.encode(eval_rows, tokenizer, source_name="validation") if eval_rows else None
    collator = Collator(tokenizer, recipe.task, mlm_probability=data.mlm_probability)
    teachers = LiveTeachers(zip(teacher_models, [t.weight for t in recipe.teachers]), recipe.task) \
        if teacher_models else None
    sizes = {"student": count_parameters(student)}
    if teacher_models:
        sizes["teacher"] = count_parameters(teacher_models[0])
    job = TrainJob(student, recipe.task, teachers, list(recipe.objective), train_examples, eval_examples, collator,
                   recipe.training, recipe.run_dir, vocab_size)
    return job, tokenizer, sizes


def check_run_dir(recipe: Recipe, *, resume: bool, force: bool) -> None:
    """Refuse a run directory that holds the outputs of another recipe, or of this one unless resuming."""
    run_dir = recipe.run_dir
    saved = run_dir / "recipe.yaml"
    has_outputs = (run_dir / "checkpoints").exists() or (run_dir / "student").exists()
    if force or not has_outputs or not saved.exists():
        return
    if saved.read_text() != dump_recipe(recipe):
        raise ConfigError(f"{run_dir} holds a run of a different recipe ({saved}); use another output_dir, "
                          "or --force to overwrite it")
    if not resume and (run_dir / "checkpoints").exists():
        raise ConfigError(f"{run_dir} already holds a run; --resume to continue it or --force to start over")


def save_recipe(recipe: Recipe) -> Path:
    """Write the validated recipe (every default filled in) into the run directory."""
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    saved = recipe.run_dir / "recipe.yaml"
    tmp = saved.with_suffix(".yaml.tmp")
    tmp.write_text(dump_recipe(recipe))
    os.replace(tmp, saved)
    return recipe.run_dir


def _quiet_transformers() -> None:
    """No per-file progress bars from transformers (ours is enough); warnings still show."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run_distill(recipe: Recipe, *, resume: bool = False, force: bool = False, progress: bool = True,
                accelerator: Accelerator | None = None) -> dict:
    """Build and train; export the student with its tokenizer; return (and save) the summary."""
    _quiet_transformers()
    acc = accelerator or make_accelerator(recipe.training.bf16)
    check_run_dir(recipe, resume=resume, force=force)
    job, tokenizer, sizes = build_job(recipe)  # data and models load before anything is written
    run_dir = save_recipe(recipe) if acc.is_main_process else recipe.run_dir
    acc.wait_for_everyone()
    result: TrainResult = train(job, resume=resume, accelerator=acc, progress=progress)
    summary = {"recipe": recipe.name, "run_dir": str(run_dir), "parameters": sizes, **asdict(result),
               "processes": acc.num_processes}
    if acc.is_main_process:
        tokenizer.save_pretrained(run_dir / "student")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    acc.wait_for_everyone()
    return summary
