"""``kdistill self-instruct``: a recipe's Self-Instruct / Alpaca stage into ``runs/<name>/data/``.

Writes the stage files, ``data.json`` (Alpaca) / ``data.jsonl`` and the data card; every teacher
call is recorded in ``data/teacher_calls.sqlite``, so rerunning a finished or interrupted stage
costs no teacher time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from kdistill.blackbox.augment_run import make_text_teacher, teacher_licence
from kdistill.blackbox.filters import load_eval_sets
from kdistill.blackbox.self_instruct import RunResult, SelfInstructConfig, run_self_instruct
from kdistill.errors import ConfigError
from kdistill.recipe import Recipe


def self_instruct_config(recipe: Recipe) -> SelfInstructConfig:
    spec = recipe.generate
    config = SelfInstructConfig(num_instructions=spec.num_instructions, mode=spec.mode,
                                max_instances=spec.max_instances, prompts_per_call=spec.prompts_per_call,
                                max_prompts=spec.max_prompts, seed=spec.seed,
                                teacher_licence=teacher_licence(spec.teacher))
    overrides = {key: value for key, value in (("temperature", spec.temperature), ("top_p", spec.top_p),
                                               ("max_tokens", spec.max_new_tokens)) if value is not None}
    if overrides:
        config = replace(config, instruction_params=replace(config.instruction_sampling(), **overrides),
                         instance_params=replace(config.instance_sampling(), **{
                             k: v for k, v in overrides.items() if k == "max_tokens"}))
    return config


def run_generate(recipe: Recipe, progress: Callable[[str, int, int], None] | None = None) -> RunResult:
    """Run the recipe's ``generate:`` section; return the paths and counts."""
    spec = recipe.generate
    if spec is None:
        raise ConfigError("the recipe has no generate: section (teacher, num_instructions, ...)")
    out_dir = recipe.run_dir / "data"
    teacher = make_text_teacher(spec.teacher, out_dir / "teacher_calls.sqlite" if spec.teacher.replay else None)
    eval_sets = load_eval_sets(spec.eval_sets) if spec.eval_sets else None
    return run_self_instruct(teacher, out_dir, self_instruct_config(recipe), seeds=spec.seeds,
                             eval_sets=eval_sets, progress=progress)
