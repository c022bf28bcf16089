"""The ``kdistill`` command line: argument parsing and printing only.

A user mistake (:class:`kdistill.errors.KdistillError`) prints ``kdistill: error: <message>``
on one line to stderr and exits with status 2; other failures are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kdistill import __version__
from kdistill.errors import ConfigError, KdistillError


def _message_console():
    """The console for a command's messages: rich does not wrap them (soft_wrap), so paths and
    figures stay whole on one line when the output is piped or captured."""
    from rich.console import Console

    return Console(soft_wrap=True)


def _cmd_losses(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from kdistill.losses import all_losses

    table = Table(title="kdistill losses (recipe `kind`)")
    for column in ("kind", "family", "formula"):
        table.add_column(column)
    for entry in all_losses():
        table.add_row(entry.kind, entry.family, entry.formula)
    table.add_row("ce", "hard-label", "−Σ_valid log p_S(y) / n_valid (the data's labels; no teacher)")
    Console().print(table)


def _cmd_example(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from kdistill.examples.tiny_lm import result_dict, run_tiny_lm_example
    from kdistill.losses.response import DIVERGENCES

    if args.steps < 1:
        raise ConfigError(f"--steps must be ≥ 1, got {args.steps}")
    if args.kind not in DIVERGENCES:
        raise ConfigError(f"--kind {args.kind!r} is not one of {', '.join(DIVERGENCES)}")
    if not 0 < args.temperature < float("inf"):
        raise ConfigError(f"--temperature must be a positive number, got {args.temperature}")
    output = Path(args.output) if args.output else None
    if output is not None and (output.is_dir() or not output.parent.is_dir()):  # found before training, not after
        why = "is a folder" if output.is_dir() else f"is in a folder that does not exist ({output.parent})"
        raise ConfigError(f"--output {output} {why}; give a file path")
    console = _message_console()
    with Progress(TextColumn("distilling"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.4f}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("distil", total=args.steps, loss=float("nan"))
        result = run_tiny_lm_example(
            steps=args.steps, kind=args.kind, temperature=args.temperature, seed=args.seed,
            on_step=lambda step, loss: progress.update(task, advance=1, loss=loss),
        )
    shrink = 1 - result.student_params / result.teacher_params
    console.print(
        f"teacher {result.teacher_params:,} params → student {result.student_params:,} ({shrink:.0%} fewer)\n"
        f"teacher–student KL  {result.kl_before:.4f} → {result.kl_after:.4f}\n"
        f"top-1 agreement     {result.agreement_before:.1%} → {result.agreement_after:.1%}"
    )
    if output is not None:
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text(json.dumps(result_dict(result), indent=2))
        tmp.replace(output)
        console.print(f"metrics written to {output}")


def _cmd_validate(args: argparse.Namespace) -> None:
    from kdistill.recipe import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: valid ({recipe.task}, {len(recipe.objective)} objective terms, "
          f"{len(recipe.teachers)} teacher(s), output {recipe.run_dir})")
    if args.show:
        print(dump_recipe(recipe), end="")


def _cmd_distill(args: argparse.Namespace) -> None:
    import logging

    from kdistill.distill.pipeline import run_distill
    from kdistill.recipe import load_recipe

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    recipe = load_recipe(args.recipe, args.overrides)
    summary = run_distill(recipe, resume=args.resume, force=args.force, progress=not args.no_progress)
    if summary.get("processes", 1) > 1 and not _is_main_process():
        return
    sizes = summary["parameters"]
    line = f"student: {summary['run_dir']}/student ({sizes['student']['total']:,} parameters"
    if "teacher" in sizes:
        line += f", teacher {sizes['teacher']['total']:,}: {1 - sizes['student']['total'] / sizes['teacher']['total']:.0%} fewer"
    print(line + ")")
    if summary["final_eval"]:
        print("final eval: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["final_eval"].items()))
    best = summary.get("best_step")
    if best is not None and best != summary["steps"]:
        from kdistill.distill.trainer import best_metric_name

        metric = best_metric_name(recipe.training, recipe.task)
        print(f"the student holds the best evaluated weights: step {best}, {metric} {summary['best_metric']:.4f}")
    processes = summary.get("processes", 1)
    print(f"steps {summary['steps']}" + (" (stopped early)" if summary["stopped_early"] else "")
          + f", {summary['train_seconds']:.1f} s" + (f" in {processes} processes" if processes > 1 else "")
          + f"; metrics in {summary['run_dir']}/metrics.jsonl")


def _cmd_sft(args: argparse.Namespace) -> None:
    from kdistill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.task != "causal" or recipe.data.format != "instruction":
        raise ConfigError(f"{args.recipe}: kdistill sft needs task: causal and data.format: instruction "
                          f"(got task {recipe.task}, format {recipe.data.format}); use kdistill distill otherwise")
    _cmd_distill(args)


def _cmd_augment(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kdistill.blackbox.augment_run import run_augment, synthetic_path
    from kdistill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    with Progress(TextColumn("augmenting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as progress:
        task = progress.add_task("augment", total=recipe.augment.num_examples if recipe.augment else 0)
        counts = run_augment(recipe, progress=lambda done, total: progress.update(task, completed=done))
    print(f"{counts['synthetic_rows']} synthetic rows in {synthetic_path(recipe)} "
          f"({counts.get('dropped_unparsable', 0)} unparsable outputs dropped); "
          f"data card: {synthetic_path(recipe).parent / 'data_card.md'}")


def _cmd_self_instruct(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kdistill.blackbox.generate_run import run_generate
    from kdistill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        tasks: dict[str, object] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        result = run_generate(recipe, progress=progress)
    kept = result.counts.get("examples_kept")
    print(f"instruction data: {result.data_json} and {result.data_jsonl} ({kept} examples kept); "
          f"data card: {result.card_md}")


def _cmd_cache(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kdistill.distill.pipeline import run_cache
    from kdistill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    with Progress(TextColumn("caching teacher"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("cache", total=None)
        info = run_cache(recipe, progress=lambda done, total: bar.update(task, completed=done, total=total))
    print(f"teacher signal for {info['examples']} examples ({info['tokens']:,} tokens, top-{info['k']}, "
          f"{info['bytes_per_token']} bytes/token) in {info['cache_dir']}")


def _print_outcome(console, outcome: dict, run_dir) -> None:
    metrics = outcome.get("metrics") or {}
    headline = metrics.get("headline")
    if isinstance(headline, dict):
        headline = headline.get("text")
    stages = ", ".join(f"{k} {v if v == 'skipped' else f'{v:.0f} s'}" for k, v in outcome["stages"].items())
    console.print(f"stages: {stages}")
    if headline:
        console.print(f"[bold]{headline}[/bold]")
    report = run_dir / "report" / "report.html"
    if report.exists():
        console.print(f"report: {report} (and report.md, metrics.json beside it)")


def _cmd_run(args: argparse.Namespace) -> None:
    from kdistill.recipe import load_recipe
    from kdistill.stages import run_stages

    console = _message_console()
    recipe = load_recipe(args.recipe, args.overrides)
    outcome = run_stages(recipe, from_stage=args.from_stage, only=args.only, force=args.force,
                         report=lambda line: console.print(f"[dim]{line}[/dim]"))
    _print_outcome(console, outcome, recipe.run_dir)


def _cmd_demo(args: argparse.Namespace) -> None:
    from kdistill.demo.recipes import demo_recipe, prepare_tiny_demo
    from kdistill.stages import claim_run_dir, run_stages

    console = _message_console()

    def report(line: str) -> None:
        console.print(f"[dim]{line}[/dim]")

    recipe = demo_recipe(tiny=args.tiny, output_dir=args.output_dir)
    console.print(f"kdistill demo{' --tiny' if args.tiny else ''}: {recipe.run_dir}")
    claim_run_dir(recipe, force=args.force, report=report)  # before --tiny writes its teacher there
    if args.tiny:
        prepare_tiny_demo(recipe, report)
    outcome = run_stages(recipe, force=args.force, report=report,
                         evaluate_options={"repeats": 3} if not args.tiny else {"repeats": 2, "max_generate": 4})
    _print_outcome(console, outcome, recipe.run_dir)


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other error, pointing at the command's ``--help``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="kdistill", description="Knowledge distillation of language models.")
    parser.add_argument("--version", action="version", version=f"kdistill {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    losses = commands.add_parser("losses", help="list the registered KD losses and their formulas")
    losses.set_defaults(func=_cmd_losses)

    example = commands.add_parser(
        "example", help="distil a tiny random causal LM into a smaller one (offline, seconds)"
    )
    example.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    example.add_argument("--kind", default="forward_kl", help="response divergence (default forward_kl)")
    example.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T (default 1)")
    example.add_argument("--seed", type=int, default=0)
    example.add_argument("--output", help="write metrics as JSON to this file")
    example.set_defaults(func=_cmd_example)

    def recipe_command(name: str, func, help: str, recipe_help: str = "recipe YAML file",
                       training: bool = False) -> argparse.ArgumentParser:
        """A command taking a recipe and key.sub=value overrides (+ the training flags)."""
        sub = commands.add_parser(name, help=help)
        sub.add_argument("recipe", help=recipe_help)
        sub.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides, e.g. training.max_steps=100")
        if training:
            sub.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
            sub.add_argument("--force", action="store_true", help="overwrite a run directory of another recipe")
            sub.add_argument("--no-progress", action="store_true", help="no progress bar")
        sub.set_defaults(func=func)
        return sub

    validate = recipe_command("validate", _cmd_validate, "check a recipe and print it with every default")
    validate.add_argument("--show", action="store_true", help="print the validated recipe")
    recipe_command("distill", _cmd_distill, "train a student as a recipe says (white-box KD or fine-tuning)",
                   training=True)

    run = recipe_command("run", _cmd_run, "run a recipe's stages in order (generate/augment, cache, distill, evaluate)")
    run.add_argument("--from", dest="from_stage", help="rerun from this stage on")
    run.add_argument("--only", help="run only this stage")
    run.add_argument("--force", action="store_true", help="start over a run directory of another recipe")

    demo = commands.add_parser("demo", help="the offline demo: Gemma 3 270M teacher, a few minutes on a laptop")
    demo.add_argument("--tiny", action="store_true", help="tiny random models, under a minute (for CI)")
    demo.add_argument("--output-dir", help="run directory (default runs/demo or runs/demo-tiny)")
    demo.add_argument("--force", action="store_true", help="start over a run directory of another recipe")
    demo.set_defaults(func=_cmd_demo)

    recipe_command("cache", _cmd_cache, "run the teacher once and store its top-k signal for training",
                   "recipe YAML file (task: causal)")
    recipe_command("augment", _cmd_augment, "GPT3Mix: a text teacher writes labelled examples with soft labels",
                   "recipe YAML file with an augment: section")
    recipe_command("self-instruct", _cmd_self_instruct, "Self-Instruct/Alpaca: a text teacher writes instruction data",
                   "recipe YAML file with a generate: section")

    from kdistill.blackbox.serve import register_cli
    from kdistill.eval.evaluate import register_cli as register_evaluate

    register_cli(commands)
    register_evaluate(commands)

    recipe_command("sft", _cmd_sft, "instruction fine-tuning (Alpaca/chat template, loss on responses only)",
                   "recipe YAML file (task: causal, data.format: instruction)", training=True)
    return parser


def _quiet_libraries() -> None:
    """No per-file progress bars from transformers: the CLI draws its own."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides (key.sub=value) may come after options: argparse leaves those unparsed
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.prog = f"kdistill {args.command}"  # the command whose arguments they are not
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    _quiet_libraries()
    try:
        args.func(args)
    except KdistillError as error:
        print(f"kdistill: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the file system refused a path the user gave (a file where a folder goes, ...)
        where = f": {error.filename}" if error.filename else ""
        print(f"kdistill: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdistill: interrupted; what was written is kept (checkpoints, cache shards): rerun `kdistill run` "
              "or `kdistill cache` to continue, `kdistill distill` with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
