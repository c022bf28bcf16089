"""Benchmark: what ``training.compile`` saves per step, measured paired within one run.

Step times on this shared machine move by ±20% between runs, about as much as the gain being
measured, so two separate runs of ``llm_kd.py`` (without and with ``--compile``) can only bound it.
Here one training run of the ``benchmarks/llm_kd.py`` trimmed-vocabulary Gemma student has
``training.compile`` on and runs the compiled code at every other step only: an optimizer step
post-hook flips ``torch.compiler.set_stance`` between ``"default"`` and ``"force_eager"`` (the
model's own eager forward). Each compiled step is compared with the eager step next to it, so drift
cancels out. Each case runs twice, starting once compiled and once eager, so no batch is always
the compiled one. The first steps (compilation, and the recompile for dynamic shapes) are left out.

    (a) kdistill_live   live teacher: the student's and the teacher's bodies are compiled
    (b) kdistill_cache  from the top-64 cache (written first, as ``kdistill cache`` does)

bf16 mixed precision with a bf16 teacher by default (``llm_kd.py --bf16 --teacher-dtype
bfloat16``), ``--fp32`` for fp32. Reported per case: median s/step compiled and eager, and the
paired difference (compiled − eager, adjacent steps): mean ± standard error, and as a share of the
eager median.

    python benchmarks/compile_gain.py                        # both cases, bf16, 30 steps, ~12 min on 2 CPU cores
    python benchmarks/compile_gain.py --cases kdistill_live --steps 12   # a quick look

Prints a table and writes ``benchmarks/results/compile_gain.json`` (``compile_gain-fp32.json`` with ``--fp32``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from paired import (
    add_run_arguments,
    case_job,
    checked_cases,
    measure_cases,
    precision,
    train_alternating,
    write_results,
)

CASES = ("kdistill_live", "kdistill_cache")
SKIPPED_STEPS = 4  # compilation, then the recompile for dynamic shapes at the next compiled step


def _case_args(args) -> argparse.Namespace:
    """``llm_kd.py``'s settings for its cases: forward KL + CE (weight 1), lr 3e-4, compile on, no heap trimming."""
    return argparse.Namespace(**{**vars(args), "ce_weight": 1.0, "lr": 3e-4, "gradient_checkpointing": False,
                                 "trim_heap": False, "compile": True, **precision(args.fp32)})


def _run(case: str, first_compiled: bool, args, out: Path, train: Path, held: Path, queue) -> None:
    import torch

    recipe, job = case_job(case, _case_args(args), out, train, held)
    train_alternating(job, recipe.run_dir, first_compiled, queue=queue,
                      switch=lambda on: torch.compiler.set_stance("default" if on else "force_eager"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, CASES, steps=30, out="runs/bench-compile-gain")
    parser.add_argument("--fp32", action="store_true", help="fp32 student and teacher (default: bf16 autocast, bf16 teacher)")
    parser.add_argument("--results", default=None, help="default: benchmarks/results/compile_gain[-fp32].json")
    args = parser.parse_args()
    cases = checked_cases(args, CASES, SKIPPED_STEPS)
    results = Path(args.results or f"benchmarks/results/compile_gain{'-fp32' if args.fp32 else ''}.json")
    out = Path(args.out) / ("fp32" if args.fp32 else "bf16")
    rows = measure_cases(cases, _run, args, _case_args(args), out, SKIPPED_STEPS, names=("compiled", "eager"))
    setting = "fp32" if args.fp32 else "bf16 autocast, bf16 teacher"
    print(f"\ntraining.compile, paired within each run ({setting}; {args.steps} steps × 2 runs per case, "
          f"batch {args.batch})")
    print(f"{'case':<16}{'pairs':>6}{'eager s':>9}{'compiled s':>12}{'paired Δ s':>16}{'gain':>8}{'speed-up':>10}")
    for r in rows:
        print(f"{r['case']:<16}{r['pairs']:>6}{r['median_eager']:>9.3f}{r['median_compiled']:>12.3f}"
              f"{r['mean']:>+10.3f} ± {r['stderr']:.3f}{r['mean'] / r['median_eager']:>+8.0%}"
              f"{r['median_eager'] / r['median_compiled']:>9.2f}×")
    write_results(results, args, rows)


if __name__ == "__main__":
    main()
