"""Benchmark: what training from the teacher-signal cache costs over plain SFT, paired within one run.

Issue 4's target (b) ≤ 1.15× the step time of (c) compares two separate runs in
``benchmarks/llm_kd.py``, and step times on this shared machine move by ±20% between runs, so one
day's run can meet it and the next miss it. Here one training run of the ``llm_kd.py`` cache case
(the trimmed-vocabulary Gemma student, forward KL from the top-64 cache + CE, weight 1) drops its
KD term at every other step: an optimizer step post-hook switches the distiller between the
recipe's objective and its ``ce`` term alone, which is the SFT case's objective, and the cache
is then not read. Each KD step is compared with the CE-only step next to it, so drift cancels
out. Each run is made twice, starting once with KD and once without, so no batch always gets the
KD step. The first steps (compilation) are left out.

bf16 mixed precision with a bf16 teacher and ``training.compile`` by default, as in
``llm_kd.py --bf16 --teacher-dtype bfloat16 --compile``. ``--fp32`` gives fp32, and ``--eager``
runs without compile. Reported: median s/step with KD and without, and the paired difference
(KD − CE only, adjacent steps): mean ± standard error, and from it the ratio of the two step times,
1 + mean Δ / (CE-only median) (target ≤ 1.15).

    python benchmarks/cache_overhead.py                  # 30 steps × 2 runs, ~6 min on 2 CPU cores
    python benchmarks/cache_overhead.py --steps 12       # a quick look

Prints a table and writes ``benchmarks/results/cache_overhead.json`` (``--results``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
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

CASES = ("kdistill_cache",)
SKIPPED_STEPS = 4  # compilation, then the recompile for dynamic shapes


def _case_args(args) -> argparse.Namespace:
    """``llm_kd.py``'s settings for the cache case: forward KL + CE (weight 1), lr 3e-4, no heap trimming."""
    return argparse.Namespace(**{**vars(args), "ce_weight": 1.0, "lr": 3e-4, "gradient_checkpointing": False,
                                 "trim_heap": False, "compile": not args.eager, **precision(args.fp32)})


def kd_switch() -> Callable[[bool], None]:
    """Patch ``Distiller.__call__`` so that ``switch(False)`` makes its next calls run the recipe's
    ``ce`` terms only (no teacher, no cache read), and ``switch(True)`` the whole objective again.

    The distiller's own terms are swapped for the call and restored after it."""
    from kdistill.distill.distiller import Distiller

    original = Distiller.__call__
    state = {"kd": True}

    def call(self, batch, counts):
        if state["kd"]:
            return original(self, batch, counts)
        saved = self.terms, self.labels, self.uses_teacher
        kept = [(term, label) for term, label in zip(self.terms, self.labels) if term.kind == "ce"]
        if not kept:
            raise ValueError("the objective has no ce term to train with between the KD steps")
        self.terms, self.labels, self.uses_teacher = [t for t, _ in kept], [label for _, label in kept], False
        try:
            return original(self, batch, counts)
        finally:
            self.terms, self.labels, self.uses_teacher = saved

    Distiller.__call__ = call
    return lambda on: state.__setitem__("kd", on)


def _run(case: str, first_kd: bool, args, out: Path, train: Path, held: Path, queue) -> None:
    recipe, job = case_job(case, _case_args(args), out, train, held)
    train_alternating(job, recipe.run_dir, first_kd, queue=queue, switch=kd_switch())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, CASES, steps=30, out="runs/bench-cache-overhead")
    parser.add_argument("--fp32", action="store_true", help="fp32 student and teacher (default: bf16 autocast, bf16 teacher)")
    parser.add_argument("--eager", action="store_true", help="without training.compile")
    parser.add_argument("--results", default="benchmarks/results/cache_overhead.json")
    args = parser.parse_args()
    cases = checked_cases(args, CASES, SKIPPED_STEPS)
    out = Path(args.out) / (("fp32" if args.fp32 else "bf16") + ("-eager" if args.eager else ""))
    rows = measure_cases(cases, _run, args, _case_args(args), out, SKIPPED_STEPS, names=("kd", "ce"))
    for r in rows:  # (b)'s step over (c)'s, from the pairs: (CE-only median + mean Δ) / CE-only median
        r["ratio"] = 1.0 + r["mean"] / r["median_ce"]
    setting = ("fp32" if args.fp32 else "bf16 autocast, bf16 teacher") + (", eager" if args.eager else ", compiled")
    print(f"\nthe cache's KD term against CE alone, paired within each run ({setting}; {args.steps} steps × 2 runs, "
          f"batch {args.batch})")
    print(f"{'case':<16}{'pairs':>6}{'CE only s':>11}{'KD + CE s':>11}{'paired Δ s':>16}{'ratio':>8}  target ≤ 1.15")
    for r in rows:
        print(f"{r['case']:<16}{r['pairs']:>6}{r['median_ce']:>11.3f}{r['median_kd']:>11.3f}"
              f"{r['mean']:>+10.3f} ± {r['stderr']:.3f}{r['ratio']:>7.2f}×  {'met' if r['ratio'] <= 1.15 else 'MISSED'}")
    write_results(Path(args.results), args, rows)


if __name__ == "__main__":
    main()
