"""``kdistill run RECIPE``: a recipe's stages in order, skipping finished ones, resuming interrupted ones.

Stages: ``generate`` (Self-Instruct, when the recipe has ``generate:``), ``augment`` (GPT3Mix, when it
has ``augment:``), ``cache`` (when ``signal.source`` is ``cache``), ``distill``, ``evaluate``. A stage
is finished when its outputs say so: the data card's status is ``complete``, the cache manifest
lists every example, ``summary.json`` is there, ``report/metrics.json`` is there. An unfinished stage
is rerun and resumes from what it wrote (generation and caching continue their files; training
continues from its last checkpoint). A stage whose input files changed since it ran (see
:mod:`kdistill.stage_inputs`) runs again from the start, and so does every stage after it.

The stages share one process. After each, freed memory goes back to the OS
(:func:`~kdistill.distill.memory.return_free_memory`): glibc keeps a stage's freed heap, and the
next stage's peak came on top of it (the Gemma demo: 1.48 GiB resident after ``generate``
against 0.37 before it, and a 2.96 GiB peak in ``cache``, ~0.5 GiB above any stage's own).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from kdistill.errors import ConfigError
from kdistill.recipe import Recipe
from kdistill.stage_inputs import changed_input, fingerprint, last_run_finished, record

log = logging.getLogger(__name__)
STAGES = ("generate", "augment", "cache", "distill", "evaluate")


def recipe_stages(recipe: Recipe) -> list[str]:
    """The stages this recipe has, in order."""
    stages = []
    if recipe.generate is not None:
        stages.append("generate")
    if recipe.augment is not None:
        stages.append("augment")
    if recipe.signal.source == "cache":
        stages.append("cache")
    stages += ["distill", "evaluate"]
    return stages


def _card_complete(data_dir: Path) -> bool:
    card = data_dir / "data_card.json"
    return card.is_file() and json.loads(card.read_text()).get("status") == "complete"


def is_finished(recipe: Recipe, stage: str) -> bool:
    """Whether ``stage``'s outputs in the run directory are complete."""
    run_dir = recipe.run_dir
    if stage in ("generate", "augment"):
        return _card_complete(run_dir / "data")
    if stage == "cache":
        manifest = recipe.cache_dir / "manifest.json"
        if not manifest.is_file():
            return False
        from kdistill.signals.cache import Manifest

        return Manifest.from_json(manifest.read_text(), str(manifest)).complete  # a damaged one is named
    if stage == "distill":
        return (run_dir / "summary.json").is_file() and (run_dir / "student" / "config.json").is_file()
    return (run_dir / "report" / "metrics.json").is_file()


def claim_run_dir(recipe: Recipe, *, force: bool, report: Callable[[str], None] = log.info) -> None:
    """Make the run directory this recipe's: refuse one that holds another recipe's run unless
    ``force`` (then move it aside to ``<dir>.replaced-<time>``; nothing is deleted); write the recipe."""
    from kdistill.distill.pipeline import save_recipe
    from kdistill.recipe import dump_recipe

    saved = recipe.run_dir / "recipe.yaml"
    if saved.is_file() and saved.read_text() != dump_recipe(recipe):
        if not force:
            raise ConfigError(f"{recipe.run_dir} holds a run of a different recipe ({saved}); use another "
                              "output_dir, or --force to start it over")
        backup = move_aside(recipe.run_dir)  # --force starts over, but never destroys the other run
        report(f"{recipe.run_dir} held another recipe's run: moved to {backup}")
    save_recipe(recipe)


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``<path>.replaced-<time>`` (a free name); return the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup, n = path.with_name(f"{path.name}.replaced-{stamp}"), 1
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
    path.rename(backup)
    return backup


def _set_aside(recipe: Recipe, stage: str, report: Callable[[str], None]) -> None:
    """Move the outputs of a stale ``generate``, ``augment`` or ``cache`` stage aside (never deleted)
    so that it starts over; the record of teacher calls stays, so prompts asked before cost nothing.
    (``distill`` and ``evaluate`` run with ``force``, which replaces their outputs.)"""
    if stage in ("generate", "augment"):
        data_dir = recipe.run_dir / "data"
        if data_dir.exists():
            backup = move_aside(data_dir)
            data_dir.mkdir()
            for calls in backup.glob("teacher_calls.sqlite*"):
                shutil.copy2(calls, data_dir / calls.name)
            report(f"{stage}: its earlier data moved to {backup}; the teacher calls are kept for replay")
    elif stage == "cache" and recipe.cache_dir.exists():
        report(f"cache: the earlier cache moved to {move_aside(recipe.cache_dir)}")


def run_stages(recipe: Recipe, *, from_stage: str | None = None, only: str | None = None, force: bool = False,
               report: Callable[[str], None] = log.info, evaluate_options: dict | None = None) -> dict:
    """Run the recipe's stages; return {stage: "skipped" | seconds} and the evaluation metrics.

    A run directory that holds another recipe is refused unless ``force`` (then it is started over).
    """
    claim_run_dir(recipe, force=force, report=report)
    stages = recipe_stages(recipe)
    for name, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in stages:
            raise ConfigError(f"{name} {value!r}: this recipe's stages are {', '.join(stages)}")
    if only is not None:
        selected = [only]
    elif from_stage is not None:
        selected = stages[stages.index(from_stage):]
    else:
        selected = stages
    forced = set(selected) if (only or from_stage) else set()
    done: dict = {}
    metrics: dict = {}
    stale = False  # an input of this or an earlier stage changed since it ran: this stage runs again
    for stage in selected:
        files = fingerprint(recipe, stage)  # hashed once: what this stage reads now
        if stage not in forced and not stale:
            changed = changed_input(recipe, stage, files)  # also for an interrupted stage: not resumed on other data
            if changed is not None:
                report(f"{stage}: {changed} since it ran; running it and the stages after it again")
                stale = True
            elif is_finished(recipe, stage):
                finished = last_run_finished(recipe, stage)
                if finished is False:  # complete outputs, but not of its last run (on these files): older ones
                    report(f"{stage}: its outputs are from a run on other inputs; running it and the stages after "
                           "it again")
                    stale = True
                else:
                    if finished is None:
                        record(recipe, stage, files, finished=True)  # finished outside kdistill run: from these files
                    report(f"{stage}: finished earlier, skipped")
                    done[stage] = "skipped"
                    continue
        if stale:
            _set_aside(recipe, stage, report)
        record(recipe, stage, files, finished=False)  # what this run reads; an interrupted run is compared with it
        report(f"{stage}: running")
        start = time.perf_counter()
        metrics = _run_stage(recipe, stage, forced=stage in forced or stale,
                             evaluate_options=evaluate_options or {}) or metrics
        from kdistill.distill.memory import return_free_memory  # here: torch only once a stage has run

        return_free_memory()  # the next stage starts from what the process holds, not what this one freed
        record(recipe, stage, files, finished=True)  # the files as they were when it started
        done[stage] = round(time.perf_counter() - start, 1)
        report(f"{stage}: done in {done[stage]:.0f} s")
    if not metrics and is_finished(recipe, "evaluate"):
        metrics = json.loads((recipe.run_dir / "report" / "metrics.json").read_text())
    return {"stages": done, "metrics": metrics}


def _run_stage(recipe: Recipe, stage: str, *, forced: bool, evaluate_options: dict) -> dict | None:
    if stage == "generate":
        from kdistill.blackbox.generate_run import run_generate

        run_generate(recipe)
    elif stage == "augment":
        from kdistill.blackbox.augment_run import run_augment

        run_augment(recipe)
    elif stage == "cache":
        from kdistill.distill.pipeline import run_cache

        run_cache(recipe)
    elif stage == "distill":
        from kdistill.distill.checkpoint import checkpoint_dirs
        from kdistill.distill.pipeline import run_distill

        resume = not forced and bool(checkpoint_dirs(recipe.run_dir / "checkpoints"))
        run_distill(recipe, resume=resume, force=not resume)  # the run directory was checked in run_stages
    else:
        from kdistill.eval.evaluate import evaluate_run

        return evaluate_run(recipe.run_dir, force=True, **evaluate_options)
    return None
