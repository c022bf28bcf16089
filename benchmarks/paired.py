"""Paired step times: one training run switches a setting on and off at alternate steps.

Day-to-day speed on a shared machine moves step times by ±20%, often more than the effect being
measured, so two separate runs can only bound it. Comparing each step with its neighbour, in one
run where the setting flips every step, cancels the drift out. Used by ``heap_trim_cost.py``,
``compile_gain.py`` and ``cache_overhead.py``: each case runs twice, starting once with the
setting on and once off, so no batch is always the one with it on.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path


def paired_difference(seconds: list[float], on: list[bool]) -> dict:
    """On − off step time over adjacent pairs of alternating steps.

    ``seconds[i]`` is step i's time and ``on[i]`` whether the setting was on in it; steps pair up
    as (i, i + 1) for even i, and each pair must hold one step of each kind. Returns the pairs'
    differences d, their mean, median and standard error (stdev(d)/√n), and the medians of each kind.
    """
    if len(seconds) != len(on):
        raise ValueError(f"{len(seconds)} step times for {len(on)} on/off flags")
    diffs = []
    for i in range(0, len(seconds) - 1, 2):
        if on[i] == on[i + 1]:
            raise ValueError(f"steps {i} and {i + 1} are both {'on' if on[i] else 'off'}")
        with_it, without = (seconds[i], seconds[i + 1]) if on[i] else (seconds[i + 1], seconds[i])
        diffs.append(with_it - without)
    if len(diffs) < 2:
        raise ValueError("need at least two pairs of steps")
    return {"pairs": len(diffs), "diffs": diffs, "mean": statistics.fmean(diffs), "median": statistics.median(diffs),
            "stderr": statistics.stdev(diffs) / len(diffs) ** 0.5,
            "median_on": statistics.median(s for s, o in zip(seconds, on) if o),
            "median_off": statistics.median(s for s, o in zip(seconds, on) if not o)}


def alternating_runs(cases: list[str], run: Callable, run_args: tuple, case_dir: Path,
                     skipped_steps: int) -> dict[str, dict]:
    """Each case twice (first step on, then first step off), each run in a spawned process.

    ``run(case, first_on, *run_args, queue)`` trains and puts ``{"seconds": [...], "on": [...]}``
    (one entry per step). Everything but ``cache`` under ``case_dir / case`` is removed before
    each run. The first ``skipped_steps`` of each run are left out and whole pairs kept; returns
    :func:`paired_difference` of each case.
    """
    ctx = mp.get_context("spawn")
    results = {}
    for case in cases:
        seconds, on = [], []
        for first_on in (True, False):
            for stale in (case_dir / case).glob("*"):
                if stale.name != "cache":
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            queue = ctx.Queue()
            proc = ctx.Process(target=run, args=(case, first_on, *run_args, queue))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                sys.exit(f"{case}: training failed (exit code {proc.exitcode})")
            got = queue.get()
            kept = (len(got["seconds"]) - skipped_steps) // 2 * 2  # whole pairs only: runs must not share one
            seconds += got["seconds"][skipped_steps:skipped_steps + kept]
            on += got["on"][skipped_steps:skipped_steps + kept]
        results[case] = paired_difference(seconds, on)
    return results


def train_alternating(job, run_dir: Path, first_on: bool, switch: Callable[[bool], None], queue) -> None:
    """Train ``job`` (no evaluation) with the setting on at alternate steps, starting with ``first_on``.

    ``switch(on)`` applies the setting before the first step and after each optimizer step. Puts
    ``{"seconds": [...], "on": [...]}`` (step times from ``run_dir / "metrics.jsonl"``) on ``queue``.
    """
    import json

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from kdistill.distill.trainer import TrainJob, train

    state = {"on": first_on, "steps": []}

    def flip(optimizer, args, kwargs) -> None:
        state["steps"].append(state["on"])
        state["on"] = not state["on"]
        switch(state["on"])

    switch(first_on)
    hook = register_optimizer_step_post_hook(flip)
    try:
        train(TrainJob(**{**job.__dict__, "eval_examples": None}), progress=False)
    finally:
        hook.remove()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    queue.put({"seconds": [r["seconds_per_step"] for r in records if "seconds_per_step" in r], "on": state["steps"]})


def add_run_arguments(parser, cases: tuple[str, ...], steps: int, out: str) -> None:
    """The options the paired benchmarks share (``llm_kd.py``'s data and batch)."""
    import llm_kd

    parser.add_argument("--cases", default=",".join(cases))
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per run (two runs per case)")
    llm_kd.add_data_arguments(parser)
    parser.add_argument("--out", default=out)


def write_results(path: Path, args, rows: list[dict]) -> None:
    """The run's settings, commit, library versions and rows as JSON at ``path``."""
    import json

    import llm_kd

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": vars(args), "commit": llm_kd._commit(), "versions": llm_kd._versions(),
                                "rows": rows}, indent=2))
    print(f"wrote {path}")


def checked_cases(args, cases: tuple[str, ...], skipped_steps: int) -> list[str]:
    """``--cases`` as a list; exits with a one-line reason if a case is unknown, ``--steps`` leaves
    fewer than two pairs after the ``skipped_steps``, or the data is absent."""
    import llm_kd

    llm_kd.require_data()
    chosen = llm_kd.chosen_cases(args.cases, cases)
    if args.steps < skipped_steps + 4:
        sys.exit(f"--steps: give at least {skipped_steps + 4} (the first {skipped_steps} are left out)")
    return chosen


def precision(fp32: bool) -> dict:
    """``llm_kd.py``'s precision settings: bf16 autocast with a bf16 teacher, or fp32 for both."""
    return {"bf16": False, "teacher_dtype": "float32"} if fp32 else {"bf16": True, "teacher_dtype": "bfloat16"}


def case_job(case: str, case_args, out: Path, train: Path, held: Path):
    """In a case's own process: torch set to ``case_args.threads`` threads, then ``llm_kd.py``'s
    trimmed-vocabulary recipe for ``case`` under ``case_args``, and its job. Returns (recipe, job)."""
    import torch

    torch.set_num_threads(case_args.threads)
    import llm_kd

    from kdistill.distill.pipeline import build_job
    from kdistill.recipe import parse_recipe

    recipe = parse_recipe(llm_kd._recipe_text(case, "trimmed", out, train, held, case_args))
    job, _, _, _ = build_job(recipe)
    return recipe, job


def measure_cases(cases: list[str], run: Callable, args, case_args, out: Path, skipped_steps: int,
                  names: tuple[str, str]) -> list[dict]:
    """``llm_kd.py``'s data (and the cache case's cache, for ``case_args``) under ``out``, then each
    case's :func:`alternating_runs`; rows name the medians ``median_<on name>`` and ``median_<off name>``."""
    import llm_kd

    train, held = llm_kd._write_data(out, args.train, args.held_out, args.max_length)
    if "kdistill_cache" in cases:
        llm_kd.write_trimmed_cache(case_args, out, train, held)
    paired = alternating_runs(cases, run, (args, out, train, held), out / "trimmed", skipped_steps)
    on, off = names
    return [{"case": case, **{k: v for k, v in p.items() if k not in ("median_on", "median_off")},
             f"median_{on}": p["median_on"], f"median_{off}": p["median_off"]} for case, p in paired.items()]
