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


def _cmd_losses(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from kdistill.losses import all_losses

    table = Table(title="kdistill losses (recipe `kind`)")
    for column in ("kind", "family", "formula"):
        table.add_column(column)
    for entry in all_losses():
        table.add_row(entry.kind, entry.family, entry.formula)
    Console().print(table)


def _cmd_example(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from kdistill.examples.tiny_lm import result_dict, run_tiny_lm_example
    from kdistill.losses.response import DIVERGENCES

    if args.steps < 1:
        raise ConfigError(f"--steps must be ≥ 1, got {args.steps}")
    if args.kind not in DIVERGENCES:
        raise ConfigError(f"--kind {args.kind!r} is not one of {', '.join(DIVERGENCES)}")
    console = Console()
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
    if args.output:
        path = Path(args.output)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result_dict(result), indent=2))
        tmp.replace(path)
        console.print(f"metrics written to {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdistill", description="Knowledge distillation of language models.")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KdistillError as error:
        print(f"kdistill: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
