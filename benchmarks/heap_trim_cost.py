"""Benchmark: what ``training.trim_heap`` costs per step, measured paired within one run.

Day-to-day speed on a shared machine moves step times by ±20%, more than the cost being measured,
so two separate runs (``llm_kd.py`` without and with ``--trim-heap``) can only bound it. Here one
training run of the ``benchmarks/llm_kd.py`` trimmed-vocabulary Gemma student has heap trimming
on at every other step (``kdistill.distill.memory.HeapTrims`` gated; an optimizer step post-hook
flips the gate), so each trimmed step is compared with the untrimmed step next to it: drift cancels
out. Each case runs twice, once starting with trimming on and once off, so no batch is always the
trimmed one. Peak memory cannot be split within one run: it comes from ``llm_kd.py``.

    (a) kdistill_live   live teacher
    (b) kdistill_cache  from the top-64 cache (written first, as ``kdistill cache`` does)

Reported per case: median s/step with and without trimming, and the paired difference
(trimmed − untrimmed, adjacent steps, the first two steps of each run left out): mean ± standard
error, and as a share of the untrimmed median.

    python benchmarks/heap_trim_cost.py                      # both cases, 50 steps, ~13 min on 2 CPU cores
    python benchmarks/heap_trim_cost.py --cases kdistill_cache --steps 12   # a quick look

Prints a table and writes ``benchmarks/results/heap_trim_cost.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from paired import add_run_arguments, case_job, checked_cases, measure_cases, train_alternating, write_results

CASES = ("kdistill_live", "kdistill_cache")
SKIPPED_STEPS = 2  # the first steps: allocator and caches warming up


def _case_args(args) -> argparse.Namespace:
    """``llm_kd.py``'s settings for its cases: forward KL + CE (weight 1), fp32, lr 3e-4, trimming on, eager."""
    return argparse.Namespace(**{**vars(args), "ce_weight": 1.0, "teacher_dtype": "float32", "lr": 3e-4,
                                 "gradient_checkpointing": False, "trim_heap": True, "bf16": False, "compile": False})


def _run(case: str, first_trimmed: bool, args, out: Path, train: Path, held: Path, queue) -> None:
    recipe, job = case_job(case, _case_args(args), out, train, held)
    import kdistill.distill.memory as memory

    gate = {"on": first_trimmed}
    untouched_trim = memory.trim_heap
    memory.trim_heap = lambda: untouched_trim() if gate["on"] else False  # what HeapTrims calls at each point
    train_alternating(job, recipe.run_dir, first_trimmed, switch=lambda on: gate.update(on=on), queue=queue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, CASES, steps=50, out="runs/bench-heap-trim")
    parser.add_argument("--results", default="benchmarks/results/heap_trim_cost.json")
    args = parser.parse_args()
    cases = checked_cases(args, CASES, SKIPPED_STEPS)
    out = Path(args.out)
    rows = measure_cases(cases, _run, args, _case_args(args), out, SKIPPED_STEPS, names=("trimmed", "untrimmed"))
    print(f"\nheap trimming, paired within each run ({args.steps} steps × 2 runs per case, batch {args.batch})")
    print(f"{'case':<16}{'pairs':>6}{'untrimmed s':>13}{'trimmed s':>11}{'paired Δ s':>16}{'cost':>8}")
    for r in rows:
        print(f"{r['case']:<16}{r['pairs']:>6}{r['median_untrimmed']:>13.3f}{r['median_trimmed']:>11.3f}"
              f"{r['mean']:>+10.3f} ± {r['stderr']:.3f}{r['mean'] / r['median_untrimmed']:>+8.0%}")
    write_results(Path(args.results), args, rows)


if __name__ == "__main__":
    main()
