"""``kdistill distill``: from a validated recipe to a trained, exported student in the run directory.

Writes ``recipe.yaml`` (the validated recipe, every default filled in), ``metrics.jsonl``,
``checkpoints/``, ``student/`` (loads with ``AutoModel*.from_pretrained`` and ``AutoTokenizer``)
and ``summary.json`` (sizes, final evaluation, steps, time).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from accelerate import Accelerator

from kdistill.data import CausalLMFormat, ClassificationFormat, Collator, MaskedLMFormat, infer_labels, load_rows
from kdistill.data.instruction import InstructionFormat
from kdistill.data.sources import split_positions
from kdistill.distill.distiller import _family
from kdistill.distill.trainer import TrainJob, TrainResult, make_accelerator, train
from kdistill.errors import ConfigError, DataError
from kdistill.models.layers import find_layer_stack, select_layers
from kdistill.models.precision import set_inference_precision
from kdistill.models.resolve import load_config, load_model, load_tokenizer
from kdistill.models.student import count_parameters, student_from_teacher
from kdistill.recipe import Recipe, SplitSpec, dump_recipe
from kdistill.signals.live import LiveTeachers

log = logging.getLogger(__name__)


def _rows(split: SplitSpec, text_column: str) -> list[dict]:
    rows = load_rows(split.source, format=split.format, split=split.split, config_name=split.config_name,
                     text_column=text_column)
    return rows[: split.limit] if split.limit else rows


class SplitData(NamedTuple):
    """A recipe's data, split as every stage splits it; each row with its number in its source (from 1)."""

    train: list[dict]
    validation: list[dict]
    labels: list[str] | None  # class names (classification)
    train_numbers: list[int]
    validation_numbers: list[int]
    validation_source: str


def _split_rows(recipe: Recipe) -> SplitData:
    """The recipe's training and validation rows and class labels (see :class:`SplitData`)."""
    data = recipe.data
    train_rows = _rows(data.train, data.text_column)
    train_numbers = list(range(1, len(train_rows) + 1))
    validation_source = data.train.source
    if data.validation is not None:
        eval_rows = _rows(data.validation, data.text_column)
        eval_numbers = list(range(1, len(eval_rows) + 1))
        validation_source = data.validation.source
    elif data.validation_fraction > 0:
        train_idx, eval_idx = split_positions(len(train_rows), validation_fraction=data.validation_fraction,
                                              seed=recipe.training.seed)
        train_rows, eval_rows = [train_rows[i] for i in train_idx], [train_rows[i] for i in eval_idx]
        train_numbers, eval_numbers = [i + 1 for i in train_idx], [i + 1 for i in eval_idx]
    else:
        eval_rows, eval_numbers = [], []
    labels = None
    if recipe.task == "classification":
        labels = data.labels or infer_labels(train_rows, data.label_column, source_name=data.train.source,
                                             row_numbers=train_numbers)
    return SplitData(train_rows, eval_rows, labels, train_numbers, eval_numbers, validation_source)


def _check_teacher_classes(recipe: Recipe, split: SplitData) -> None:
    """A classification teacher's head must have one class per label of the data: name the mismatch
    (and, when the data has more labels than the head, the rarest label's first row: often a typo)."""
    data = recipe.data
    for spec in recipe.teachers:
        config = load_config(spec.model, trust_remote_code=recipe.trust_remote_code)
        classes = config.num_labels
        if classes == len(split.labels) or not any("Classification" in a for a in config.architectures or []):
            continue  # (a teacher without a classifier is refused by load_model, naming the missing head)
        given = "data.labels" if data.labels else f"the labels of {data.train.source}"
        message = (f"teacher {spec.model!r} classifies into {classes} classes but {given} are {len(split.labels)}: "
                   f"{', '.join(map(repr, split.labels))}")
        if not data.labels and len(split.labels) > classes:
            values = [str(row[data.label_column]).strip() for row in split.train]
            rarest = min(split.labels, key=values.count)
            number = split.train_numbers[values.index(rarest)]
            count = values.count(rarest)
            message += f"; the rarest, {rarest!r} ({count} row{'s' if count > 1 else ''}), first at row {number}"
        raise DataError(message)


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
    return a is b or a.get_vocab() == b.get_vocab()


def build_job(recipe: Recipe) -> tuple[TrainJob, object, dict]:
    """Load data, teachers and student for ``recipe``; return the job, the tokenizer and sizes.

    Each model reference's tokenizer is loaded once (``tokenizer_of``): the student's, the
    vocabulary check's and the cache manifest's are the same object where the references agree
    (trimming makes a new tokenizer and changes none). A Gemma 3 tokenizer costs ~0.3 GiB of
    resident memory to load (transformers keeps its 262,144-entry vocabulary and 514,906 merges
    as Python objects too), and freed objects leave the heap fragmented.
    """
    data = recipe.data
    tokenizer_of = functools.cache(functools.partial(load_tokenizer, trust_remote_code=recipe.trust_remote_code))
    split = _split_rows(recipe)
    labels = split.labels
    synthetic: list[dict] = []
    if recipe.augment is not None:
        from kdistill.blackbox.augment_run import synthetic_path, synthetic_rows

        synthetic = synthetic_rows(recipe, len(split.train), labels)  # checked line by line as it is read
    head_kwargs = {"labels": labels} if recipe.task == "classification" else {}
    if recipe.task == "classification":
        _check_teacher_classes(recipe, split)

    teacher_models = [load_model(t.model, recipe.task, trust_remote_code=recipe.trust_remote_code, trained=True,
                                 **head_kwargs)
                      for t in recipe.teachers]
    spec = recipe.student
    init = spec.init_from_teacher
    if init is not None:
        _, stack = find_layer_stack(teacher_models[0])
        layers = select_layers(len(stack), init.strategy, init.num_layers, init.layers)
        # a student with a trimmed vocabulary is made once the examples have planned it, so that its
        # full-vocabulary embeddings are never copied
        student = student_from_teacher(teacher_models[0], layers) if init.vocab is None else None
        tokenizer = tokenizer_of(recipe.teachers[0].model)
        log.info("student = teacher layers %s", layers)
    else:
        student = load_model(spec.model, recipe.task, trust_remote_code=recipe.trust_remote_code, **head_kwargs)
        tokenizer = tokenizer_of(spec.model)

    # response terms over a vocabulary (not a classifier's labels) compare one vocabulary's distributions
    vocab_terms = recipe.task != "classification" and any(
        _family(t.kind) == "response" and t.kind != "ce" for t in recipe.objective)
    vocab_size = None
    if vocab_terms or recipe.signal.source != "cache":  # a live teacher reads the student's token ids
        for t_spec in recipe.teachers:
            if not _same_vocabulary(tokenizer_of(t_spec.model), tokenizer):
                why = ("response terms compare distributions over one vocabulary" if vocab_terms
                       else "a live teacher reads the student's token ids")
                raise ConfigError(f"teacher {t_spec.model!r} and the student use different tokenizers; {why}")
    if vocab_terms:
        widths = {m.get_output_embeddings().weight.shape[0] for m in [student, *teacher_models]
                  if m is not None and m.get_output_embeddings() is not None}
        if len(widths) > 1:
            vocab_size = len(tokenizer)

    fmt = _format(recipe, labels)
    train_examples = fmt.encode(split.train, tokenizer, source_name=data.train.source, row_numbers=split.train_numbers)
    if synthetic:  # after the real rows, their ids continuing the real ones'; errors name synthetic.jsonl
        train_examples += [{**ex, "example_id": ex["example_id"] + len(split.train)} for ex in fmt.encode(
            synthetic, tokenizer, source_name=str(synthetic_path(recipe)))]
    eval_examples = fmt.encode(split.validation, tokenizer, source_name=split.validation_source,
                               row_numbers=split.validation_numbers) if split.validation else None
    teacher_examples = train_examples  # in the teacher's token ids (what a cache was written on)

    plan = None
    if init is not None and init.vocab is not None:
        plan, tokenizer, train_examples, eval_examples = _trim_vocabulary(
            tokenizer, train_examples, eval_examples, init.vocab.max_size)
        student = student_from_teacher(teacher_models[0], layers, vocab_plan=plan)
        vocab_size = None  # teacher targets are mapped into the student's vocabulary

    sizes = {"student": count_parameters(student)}
    if teacher_models:
        sizes["teacher"] = count_parameters(teacher_models[0])  # before a trimmed student trims the live teachers
    if recipe.signal.source == "cache":
        from kdistill.signals.cache import hash_examples, hash_model, hash_tokenizer, open_cache
        from kdistill.signals.cached import CachedTeacher

        tokenizer_sha256 = hash_tokenizer(tokenizer_of(recipe.teachers[0].model))
        tokenizer_of.cache_clear()  # an untrimmed tokenizer goes before every teacher weight is read
        teacher = set_inference_precision(teacher_models[0], recipe.teachers[0].dtype)  # as kdistill cache ran it
        expect = {"teacher_sha256": hash_model(teacher), "tokenizer_sha256": tokenizer_sha256,
                  "data_sha256": hash_examples(teacher_examples), "k": recipe.signal.k,
                  "temperature": recipe.signal.temperature}
        cache = open_cache(recipe.cache_dir, expect=expect)
        teachers = CachedTeacher(cache, None if plan is None else plan.old_to_new)
    elif teacher_models and any(t.kind != "ce" for t in recipe.objective):
        tokenizer_of.cache_clear()  # an untrimmed tokenizer goes before the teachers are trimmed and copied
        teachers = LiveTeachers(zip(teacher_models, [t.weight for t in recipe.teachers]), recipe.task, plan,
                                dtypes=[t.dtype for t in recipe.teachers])
    else:  # no teacher, or one that only initialised the student: not held during training
        teachers = None
    collator = Collator(tokenizer, recipe.task, mlm_probability=data.mlm_probability)
    job = TrainJob(student, recipe.task, teachers, list(recipe.objective), train_examples, eval_examples, collator,
                   recipe.training, recipe.run_dir, vocab_size)
    extras = {"vocab_plan": plan}
    return job, tokenizer, sizes, extras


def _trim_vocabulary(tokenizer, train_examples, eval_examples, max_size):
    """Plan the vocabulary of the training (and validation) examples; trim the tokenizer to it and
    map the examples. Returns the plan, the trimmed tokenizer and the mapped examples.

    The examples keep their positions (the trimmed tokenizer reproduces the original tokenization
    on this corpus), so cached teacher rows stay aligned. An example with a dropped token (only
    possible with ``max_size``) is a :class:`DataError` naming it.
    """
    from kdistill.models.vocab import plan_vocabulary, trim_tokenizer

    corpus = [ex["input_ids"] for ex in train_examples + (eval_examples or [])]
    plan = plan_vocabulary(tokenizer, corpus, max_size=max_size)
    table = plan.old_to_new.tolist()

    def mapped(examples, what):
        out = []
        for ex in examples:
            ids = [table[i] for i in ex["input_ids"]]
            if -1 in ids:
                raise DataError(f"the trimmed vocabulary (max_size {max_size}) cannot encode {what} example "
                                f"{ex['example_id']}: token id {ex['input_ids'][ids.index(-1)]} was dropped")
            new = {**ex, "input_ids": ids}
            if "labels" in ex:
                new["labels"] = [table[i] if i >= 0 else i for i in ex["labels"]]
            out.append(new)
        return out

    train = mapped(train_examples, "training")
    evaluation = mapped(eval_examples, "validation") if eval_examples else eval_examples
    log.info("vocabulary trimmed from %d to %d tokens", plan.old_size, plan.new_size)
    return plan, trim_tokenizer(tokenizer, plan), train, evaluation


def run_cache(recipe: Recipe, progress=None) -> dict:
    """``kdistill cache``: run the recipe's teacher once over its training examples and store the
    top-k signal in ``recipe.cache_dir`` (resumable; see :mod:`kdistill.signals.cache`)."""
    from kdistill.signals.cache import write_cache

    if recipe.task != "causal" or not recipe.teachers:
        raise ConfigError("kdistill cache needs task: causal and a teacher")
    if len(recipe.teachers) > 1:
        raise ConfigError("kdistill cache stores one teacher's signal; the recipe names several")
    _quiet_transformers()
    split = _split_rows(recipe)
    tokenizer = load_tokenizer(recipe.teachers[0].model, trust_remote_code=recipe.trust_remote_code)
    examples = _format(recipe, split.labels).encode(split.train, tokenizer, source_name=recipe.data.train.source,
                                                    row_numbers=split.train_numbers)
    teacher = load_model(recipe.teachers[0].model, "causal", trust_remote_code=recipe.trust_remote_code, trained=True)
    teacher = set_inference_precision(teacher, recipe.teachers[0].dtype)
    signal = recipe.signal
    manifest = write_cache(recipe.cache_dir, teacher, tokenizer, examples, k=signal.k,
                           temperature=signal.temperature, batch_size=signal.batch_size,
                           shard_size=signal.shard_size, sampled=signal.sampled, progress=progress,
                           teacher_name=recipe.teachers[0].model, seed=recipe.training.seed)
    return {"cache_dir": str(recipe.cache_dir), "examples": manifest.n_examples, "tokens": manifest.n_tokens,
            "bytes_per_token": manifest.bytes_per_token, "k": manifest.k}


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
    if resume and (run_dir / "summary.json").exists():
        raise ConfigError(f"--resume: the run in {run_dir} has finished (summary.json); nothing to resume "
                          "(--force starts it over)")


# what a distillation run writes into its run directory (and an evaluation of its student: report/)
RUN_OUTPUTS = ("checkpoints", "student", "summary.json", "metrics.jsonl", "tensorboard", "report")


def start_run_dir(recipe: Recipe, *, force: bool) -> None:
    """Write the validated recipe into the run directory; with ``force``, first remove what an
    earlier run of this directory wrote (:data:`RUN_OUTPUTS`), so none of it is taken for this run's.

    Called once the run has been set up (data, models, objective checked), so bad input never
    reaches the directory."""
    if force:
        for name in RUN_OUTPUTS:
            path = recipe.run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    save_recipe(recipe)


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
    job, tokenizer, sizes, extras = build_job(recipe)  # data and models load before anything is written
    run_dir = recipe.run_dir
    # the recipe (and, with --force, clearing the old outputs) once training is set up: bad input writes nothing
    result: TrainResult = train(job, resume=resume, accelerator=acc, progress=progress,
                                on_ready=lambda: start_run_dir(recipe, force=force and not resume))
    summary = {"recipe": recipe.name, "run_dir": str(run_dir), "parameters": sizes, **asdict(result),
               "processes": acc.num_processes}
    if acc.is_main_process:
        tokenizer.save_pretrained(run_dir / "student")
        plan = extras.get("vocab_plan")
        if plan is not None:  # how the student's ids map to the teacher's (for evaluation against it)
            (run_dir / "student" / "kdistill_vocab.json").write_text(json.dumps(
                {"teacher_vocab_size": plan.old_size, "new_to_old": plan.new_to_old.tolist()}))
            summary["vocabulary"] = {"teacher": plan.old_size, "student": plan.new_size}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    acc.wait_for_everyone()
    return summary
