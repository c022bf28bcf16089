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
import json
import multiprocessing as mp
import shutil
import statistics
import sys
from pathlib import Path

import llm_kd

CASES = ("kdistill_live", "kdistill_cache")
SKIPPED_STEPS = 2  # the first steps: allocator and caches warming up


def paired_difference(seconds: list[float], trimmed: list[bool]) -> dict:
    """Trimmed − untrimmed step time over adjacent pairs of alternating steps.

    ``seconds[i]`` is step i's time and ``trimmed[i]`` whether trimming was on in it; steps pair up
    as (i, i + 1) for even i, and each pair must hold one step of each kind. Returns the pairs'
    differences d, their mean, median and standard error (stdev(d)/√n), and the medians of each kind.
    """
    if len(seconds) != len(trimmed):
        raise ValueError(f"{len(seconds)} step times for {len(trimmed)} trimming flags")
    diffs = []
    for i in range(0, len(seconds) - 1, 2):
        if trimmed[i] == trimmed[i + 1]:
            raise ValueError(f"steps {i} and {i + 1} are both {'trimmed' if trimmed[i] else 'untrimmed'}")
        on, off = (seconds[i], seconds[i + 1]) if trimmed[i] else (seconds[i + 1], seconds[i])
        diffs.append(on - off)
    if len(diffs) < 2:
        raise ValueError("need at least two pairs of steps")
    return {"pairs": len(diffs), "diffs": diffs, "mean": statistics.fmean(diffs), "median": statistics.median(diffs),
            "stderr": statistics.stdev(diffs) / len(diffs) ** 0.5,
            "median_trimmed": statistics.median(s for s, t in zip(seconds, trimmed) if t),
            "median_untrimmed": statistics.median(s for s, t in zip(seconds, trimmed) if not t)}


def _case_args(args) -> argparse.Namespace:
    """``llm_kd.py``'s settings for its cases: forward KL + CE (weight 1), fp32 teacher, lr 3e-4, trimming on."""
    return argparse.Namespace(**{**vars(args), "ce_weight": 1.0, "teacher_dtype": "float32", "lr": 3e-4,
                                 "gradient_checkpointing": False, "trim_heap": True})


def _run(case: str, first_trimmed: bool, args, out: Path, train: Path, held: Path, queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import kdistill.distill.memory as memory
    from kdistill.distill.pipeline import build_job
    from kdistill.distill.trainer import TrainJob
    from kdistill.distill.trainer import train as train_loop
    from kdistill.recipe import parse_recipe

    recipe = parse_recipe(llm_kd._recipe_text(case, "trimmed", out, train, held, _case_args(args)))
    job, _, _, _ = build_job(recipe)
    gate = {"on": first_trimmed, "steps": []}
    untouched_trim = memory.trim_heap
    memory.trim_heap = lambda: untouched_trim() if gate["on"] else False  # what HeapTrims calls at each point

    def flip(optimizer, args, kwargs) -> None:
        gate["steps"].append(gate["on"])
        gate["on"] = not gate["on"]

    register_optimizer_step_post_hook(flip)
    train_loop(TrainJob(**{**job.__dict__, "eval_examples": None}), progress=False)
    records = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds_per_step"] for r in records if "seconds_per_step" in r]
    queue.put({"seconds": seconds, "trimmed": gate["steps"]})


def _write_cache(args, out: Path, train: Path, held: Path) -> None:
    """The cache case's top-64 cache, written in a process of its own (skipped when complete)."""
    from kdistill.recipe import parse_recipe

    recipe = parse_recipe(llm_kd._recipe_text("kdistill_cache", "trimmed", out, train, held, _case_args(args)))
    llm_kd.write_cache_apart(recipe, args.threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per run (two runs per case)")
    parser.add_argument("--train", type=int, default=480, help="training rows")
    parser.add_argument("--held-out", type=int, default=48, help="held-out rows")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-heap-trim")
    parser.add_argument("--results", default="benchmarks/results/heap_trim_cost.json")
    args = parser.parse_args()
    if not llm_kd.DATA.exists():
        sys.exit(f"skipped: {llm_kd.DATA} not found (the benchmark reads SST-2 from ../shared/data)")
    cases = args.cases.split(",")
    if unknown := sorted(set(cases) - set(CASES)):
        sys.exit(f"--cases: unknown case {unknown[0]!r} (choose from {', '.join(CASES)})")
    out = Path(args.out)
    train, held = llm_kd._write_data(out, args.train, args.held_out, args.max_length)
    if "kdistill_cache" in cases:
        _write_cache(args, out, train, held)
    ctx = mp.get_context("spawn")
    rows = []
    for case in cases:
        seconds, trimmed = [], []
        for first_trimmed in (True, False):
            for stale in (out / "trimmed" / case).glob("*"):
                if stale.name != "cache":
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            queue = ctx.Queue()
            proc = ctx.Process(target=_run, args=(case, first_trimmed, args, out, train, held, queue))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                sys.exit(f"{case}: training failed (exit code {proc.exitcode})")
            run = queue.get()
            kept = (len(run["seconds"]) - SKIPPED_STEPS) // 2 * 2  # whole pairs only: runs must not share one
            seconds += run["seconds"][SKIPPED_STEPS:SKIPPED_STEPS + kept]
            trimmed += run["trimmed"][SKIPPED_STEPS:SKIPPED_STEPS + kept]
        rows.append({"case": case, **paired_difference(seconds, trimmed)})
    print(f"\nheap trimming, paired within each run ({args.steps} steps × 2 runs per case, batch {args.batch})")
    print(f"{'case':<16}{'pairs':>6}{'untrimmed s':>13}{'trimmed s':>11}{'paired Δ s':>16}{'cost':>8}")
    for r in rows:
        print(f"{r['case']:<16}{r['pairs']:>6}{r['median_untrimmed']:>13.3f}{r['median_trimmed']:>11.3f}"
              f"{r['mean']:>+10.3f} ± {r['stderr']:.3f}{r['mean'] / r['median_untrimmed']:>+8.0%}")
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": vars(args), "commit": llm_kd._commit(), "versions": llm_kd._versions(),
                                "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
