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
import json
import multiprocessing as mp
import shutil
import sys
from pathlib import Path

import llm_kd
from heap_trim_cost import paired_difference

CASES = ("kdistill_live", "kdistill_cache")
SKIPPED_STEPS = 4  # compilation, then the recompile for dynamic shapes at the next compiled step


def _case_args(args) -> argparse.Namespace:
    """``llm_kd.py``'s settings for its cases: forward KL + CE (weight 1), lr 3e-4, compile on, no heap trimming."""
    precision = {"bf16": False, "teacher_dtype": "float32"} if args.fp32 else {"bf16": True,
                                                                              "teacher_dtype": "bfloat16"}
    return argparse.Namespace(**{**vars(args), "ce_weight": 1.0, "lr": 3e-4, "gradient_checkpointing": False,
                                 "trim_heap": False, "compile": True, **precision})


def _run(case: str, first_compiled: bool, args, out: Path, train: Path, held: Path, queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from kdistill.distill.pipeline import build_job
    from kdistill.distill.trainer import TrainJob
    from kdistill.distill.trainer import train as train_loop
    from kdistill.recipe import parse_recipe

    recipe = parse_recipe(llm_kd._recipe_text(case, "trimmed", out, train, held, _case_args(args)))
    job, _, _, _ = build_job(recipe)
    gate = {"on": first_compiled, "steps": []}

    def stance() -> None:
        torch.compiler.set_stance("default" if gate["on"] else "force_eager")

    def flip(optimizer, args, kwargs) -> None:
        gate["steps"].append(gate["on"])
        gate["on"] = not gate["on"]
        stance()

    stance()
    register_optimizer_step_post_hook(flip)
    train_loop(TrainJob(**{**job.__dict__, "eval_examples": None}), progress=False)
    records = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds_per_step"] for r in records if "seconds_per_step" in r]
    queue.put({"seconds": seconds, "compiled": gate["steps"]})


def _write_cache(args, out: Path, train: Path, held: Path) -> None:
    """The cache case's top-64 cache, written in a process of its own (skipped when complete)."""
    from kdistill.recipe import parse_recipe

    recipe = parse_recipe(llm_kd._recipe_text("kdistill_cache", "trimmed", out, train, held, _case_args(args)))
    llm_kd.write_cache_apart(recipe, args.threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (two runs per case)")
    parser.add_argument("--fp32", action="store_true", help="fp32 student and teacher (default: bf16 autocast, bf16 teacher)")
    parser.add_argument("--train", type=int, default=480, help="training rows")
    parser.add_argument("--held-out", type=int, default=48, help="held-out rows")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-compile-gain")
    parser.add_argument("--results", default=None, help="default: benchmarks/results/compile_gain[-fp32].json")
    args = parser.parse_args()
    if not llm_kd.DATA.exists():
        sys.exit(f"skipped: {llm_kd.DATA} not found (the benchmark reads SST-2 from ../shared/data)")
    cases = args.cases.split(",")
    if unknown := sorted(set(cases) - set(CASES)):
        sys.exit(f"--cases: unknown case {unknown[0]!r} (choose from {', '.join(CASES)})")
    if args.steps < SKIPPED_STEPS + 4:
        sys.exit(f"--steps: give at least {SKIPPED_STEPS + 4} (the first {SKIPPED_STEPS} are left out)")
    results = Path(args.results or f"benchmarks/results/compile_gain{'-fp32' if args.fp32 else ''}.json")
    out = Path(args.out) / ("fp32" if args.fp32 else "bf16")
    train, held = llm_kd._write_data(out, args.train, args.held_out, args.max_length)
    if "kdistill_cache" in cases:
        _write_cache(args, out, train, held)
    ctx = mp.get_context("spawn")
    rows = []
    for case in cases:
        seconds, compiled = [], []
        for first_compiled in (True, False):
            for stale in (out / "trimmed" / case).glob("*"):
                if stale.name != "cache":
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            queue = ctx.Queue()
            proc = ctx.Process(target=_run, args=(case, first_compiled, args, out, train, held, queue))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                sys.exit(f"{case}: training failed (exit code {proc.exitcode})")
            run = queue.get()
            kept = (len(run["seconds"]) - SKIPPED_STEPS) // 2 * 2  # whole pairs only: runs must not share one
            seconds += run["seconds"][SKIPPED_STEPS:SKIPPED_STEPS + kept]
            compiled += run["compiled"][SKIPPED_STEPS:SKIPPED_STEPS + kept]
        paired = paired_difference(seconds, compiled)  # its "trimmed" is our "compiled"
        rows.append({"case": case, "pairs": paired["pairs"], "diffs": paired["diffs"], "mean": paired["mean"],
                     "median": paired["median"], "stderr": paired["stderr"],
                     "median_compiled": paired["median_trimmed"], "median_eager": paired["median_untrimmed"]})
    precision = "fp32" if args.fp32 else "bf16 autocast, bf16 teacher"
    print(f"\ntraining.compile, paired within each run ({precision}; {args.steps} steps × 2 runs per case, "
          f"batch {args.batch})")
    print(f"{'case':<16}{'pairs':>6}{'eager s':>9}{'compiled s':>12}{'paired Δ s':>16}{'gain':>8}{'speed-up':>10}")
    for r in rows:
        print(f"{r['case']:<16}{r['pairs']:>6}{r['median_eager']:>9.3f}{r['median_compiled']:>12.3f}"
              f"{r['mean']:>+10.3f} ± {r['stderr']:.3f}{r['mean'] / r['median_eager']:>+8.0%}"
              f"{r['median_eager'] / r['median_compiled']:>9.2f}×")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"config": vars(args), "commit": llm_kd._commit(), "versions": llm_kd._versions(),
                                   "rows": rows}, indent=2))
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
