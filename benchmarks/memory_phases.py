"""Benchmark: where a training step's memory peaks and its time goes, phase by phase (one case of ``llm_kd.py``).

Trains one kdistill case of ``benchmarks/llm_kd.py`` (the same recipe, data and options) while a
thread samples, every millisecond and at every change of phase, the process's resident memory
(RSS) and, with glibc, what malloc has handed out and not taken back ("in use"). Each sample is
labelled with the phase of the step running then, and the time between phase changes is summed
per step and phase:

    setup            before the first step (the trainer preparing the models, compiling them)
    collate          the step's start: trimming (``--trim-heap``) and collating the batch
    student forward  the student's forward pass (it runs first)
    teacher forward  the live teacher's forward, or reading the cache's rows
    loss             the loss terms; the chunked response loss makes its gradients here
    backward         autograd's backward pass
    optimizer        gradient clipping, the optimizer step, zeroing the gradients

Printed: each phase's peak RSS, peak in-use memory and median seconds per step (steps after
the first two, which compile, and before the last, which also exports), and the make-up of the run's highest RSS:
malloc's heap (in use and free), its mmapped chunks, Python's object arenas (pymalloc's, as of
the last change of phase), the rest of the anonymous memory (thread stacks, the C libraries' own
mappings, ...) and file-backed pages (the libraries), next to the floor of
``llm_kd.py`` (the process after its imports, plus the weights, gradients and Adam moments).
RSS above "in use" is memory the C library keeps after it was freed; in use above the floor is
what the step itself holds (activations, the loss's buffers, gradients). With ``--trim-heap`` the
heap's free part includes pages given back to the OS (malloc counts them, RSS does not), so the
other anonymous memory, found by difference, comes out too small, even below zero.

    python benchmarks/memory_phases.py --bf16 --teacher-dtype bfloat16 --compile   # live teacher, ~3 min
    python benchmarks/memory_phases.py --case kdistill_cache --bf16 --teacher-dtype bfloat16 --compile

Writes ``benchmarks/results/memory_phases.json`` (``--results``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llm_kd

PHASES = ("setup", "collate", "student forward", "teacher forward", "loss", "backward", "optimizer")
CASES = ("kdistill_live", "kdistill_cache", "sft")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2():
    """glibc's ``mallinfo2`` (all arenas), or None where the C library has none."""
    try:
        function = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    function.restype = _MallInfo2
    return function


def python_heap() -> dict | None:
    """CPython's small-object allocator (pymalloc: objects of ≤ 512 bytes, in arenas it maps
    itself, apart from malloc): ``{"arenas": bytes mapped, "objects": bytes of live objects}``,
    parsed from ``sys._debugmallocstats`` (which writes to the C-level stderr, caught here in a
    temporary file; ~0.5 ms with 300 arenas). None where there is no such report (another
    interpreter, ``PYTHONMALLOC=malloc``). Call from the main thread: fd 2 is swapped meanwhile."""
    report = getattr(sys, "_debugmallocstats", None)
    if report is None:
        return None
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile("w+") as caught:
            os.dup2(caught.fileno(), 2)
            try:
                report()
            finally:
                os.dup2(saved, 2)
            caught.seek(0)
            text = caught.read()
    finally:
        os.close(saved)
    objects = re.search(r"^# bytes in allocated blocks\s*=\s*([\d,]+)", text, re.M)
    arenas = re.search(r"^Total\s*=\s*([\d,]+)", text, re.M)  # the first total: all arenas
    if objects is None or arenas is None:
        return None
    return {"arenas": int(arenas[1].replace(",", "")), "objects": int(objects[1].replace(",", ""))}


class PhaseMemory:
    """A thread that samples RSS (and malloc's in-use bytes) every ``interval`` s, per ``phase``;
    each change of phase takes a sample too.

    ``peaks[phase] = {"rss": bytes, "in_use": bytes or None}``; ``at_peak``: the phase and the
    make-up of the highest RSS sampled (heap in use and free, mmapped chunks, Python's arenas and
    objects, other anonymous and file-backed pages); :meth:`step_seconds`: the time spent in each
    phase, step by step. Linux only (``/proc/self``). Use as a context manager; set ``phase``
    from the main thread (Python's heap is read there, at each change: :func:`python_heap`).
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self._phase = "setup"
        self._timeline: list[tuple[str, float]] = [("setup", time.perf_counter())]
        self._end: float | None = None
        self.peaks: dict[str, dict] = {}
        self.at_peak: dict = {}
        self._mallinfo = _mallinfo2()
        self._python = python_heap()  # as of the last change of phase
        self._lock = threading.Lock()  # the thread's samples and those taken at phase changes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="phase-memory", daemon=True)

    def __enter__(self) -> PhaseMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._end = time.perf_counter()
        self._stop.set()
        self._thread.join()

    @property
    def phase(self) -> str:
        """The phase running now; setting it starts that phase's clock."""
        return self._phase

    @phase.setter
    def phase(self, phase: str) -> None:
        self._timeline.append((phase, time.perf_counter()))
        self._phase = phase
        self._python = python_heap()
        self.sample()  # so a phase shorter than the sampling interval is sampled too

    def step_seconds(self) -> list[dict[str, float]]:
        """Seconds per phase, one dict per step: a step starts where ``collate`` follows another
        phase (what ran before the first one is a step of its own, ``setup``). Call after exit."""
        end = self._end if self._end is not None else time.perf_counter()
        steps: list[dict[str, float]] = []
        previous = None
        for (phase, start), (_, stop) in zip(self._timeline, [*self._timeline[1:], ("", end)]):
            if not steps or (phase == "collate" and previous != "collate"):
                steps.append({})
            steps[-1][phase] = steps[-1].get(phase, 0.0) + stop - start
            previous = phase
        return steps

    def sample(self) -> None:
        """One sample, attributed to the current phase."""
        with self._lock:
            self._sample(self.phase)

    def _sample(self, phase: str) -> None:
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * _PAGE
        info = self._mallinfo() if self._mallinfo is not None else None
        in_use = None if info is None else info.uordblks + info.hblkhd
        peak = self.peaks.setdefault(phase, {"rss": 0, "in_use": None})
        peak["rss"] = max(peak["rss"], rss)
        if in_use is not None:
            peak["in_use"] = max(peak["in_use"] or 0, in_use)
        if rss > self.at_peak.get("rss", 0):
            status = llm_kd._status("RssAnon", "RssFile")  # one read: both from the same moment
            rss_anon = status["RssAnon"]
            self.at_peak = {"phase": phase, "rss": rss, "rss_file": status["RssFile"], "rss_anon": rss_anon}
            python = self._python
            if python is not None:
                self.at_peak.update(python_arenas=python["arenas"], python_objects=python["objects"])
            if info is not None:
                heap = info.arena  # main and thread arenas: malloc'd (sbrk/arena) memory, used or free
                self.at_peak.update(heap_in_use=info.uordblks, heap_free=info.fordblks, mmapped=info.hblkhd,
                                    other_anon=rss_anon - heap - info.hblkhd - (python or {}).get("arenas", 0))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


@contextmanager
def phase_labels(memory: PhaseMemory, job) -> Iterator:
    """Label ``memory.phase`` from the trainer's own calls while ``train(job)`` runs; yields the
    job to train (its collator wrapped). Every patched function is restored on exit.

    Marks: the step's start (the heap trim that follows the optimizer, ``HeapTrims.trim``, and the
    collator; the trims ``HeapTrims``' hooks make inside a forward or backward keep that phase's
    label), ``Distiller.__call__`` (student forward, its first act), the teachers' ``__call__``
    (teacher forward; loss after it returns), the chunked loss, ``Accelerator.backward``,
    ``clip_grad_norm_`` and the optimizer's step (via torch's global step pre-hook) and ``zero_grad``.
    """
    import accelerate
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    import kdistill.distill.distiller as distiller_module
    from kdistill.distill.memory import HeapTrims
    from kdistill.distill.trainer import TrainJob

    def marked(function, phase: str, after: str | None = None):
        def call(*args, **kwargs):
            memory.phase = phase
            try:
                return function(*args, **kwargs)
            finally:
                if after is not None:
                    memory.phase = after
        return call

    def step_start(trim):  # the trainer's trim opens a step; the hooks' trims inside a phase keep its label
        def call(self, *args, **kwargs):
            if memory.phase in ("setup", "optimizer"):
                memory.phase = "collate"
            return trim(self, *args, **kwargs)
        return call

    patches = [(distiller_module.Distiller, "__call__", "student forward", None),
               (distiller_module, "chunked_distribution_losses", "loss", None),
               (accelerate.Accelerator, "backward", "backward", None),
               (torch.nn.utils, "clip_grad_norm_", "optimizer", None),
               (torch.optim.Optimizer, "zero_grad", "optimizer", None)]
    if job.teachers is not None:
        patches.append((type(job.teachers), "__call__", "teacher forward", "loss"))
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _, _ in patches]
    originals.append((HeapTrims, "trim", HeapTrims.__dict__["trim"]))
    for owner, name, phase, after in patches:
        setattr(owner, name, marked(getattr(owner, name), phase, after))
    HeapTrims.trim = step_start(HeapTrims.trim)
    step_hook = register_optimizer_step_pre_hook(lambda *args: setattr(memory, "phase", "optimizer"))
    try:
        yield TrainJob(**{**job.__dict__, "collator": marked(job.collator, "collate")})
    finally:
        step_hook.remove()
        for owner, name, original in originals:
            setattr(owner, name, original)


def _run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from floors import training_state_bytes

    from kdistill.distill.pipeline import build_job
    from kdistill.distill.trainer import TrainJob
    from kdistill.distill.trainer import train as train_loop
    from kdistill.recipe import parse_recipe

    import_rss = llm_kd._rss("VmRSS")
    out = Path(args.out)
    train, held = llm_kd._write_data(out, args.train, args.held_out, args.max_length)
    recipe = parse_recipe(llm_kd._recipe_text(args.case, "trimmed", out, train, held, args))
    if args.case == "kdistill_cache":
        llm_kd.write_cache_apart(recipe, args.threads)  # in a process of its own; only checked when complete
    job, _, _, _ = build_job(recipe)
    state = training_state_bytes(job.student, list(getattr(job.teachers, "models", ())))
    llm_kd._reset_peak_rss()
    with PhaseMemory() as memory, phase_labels(memory, TrainJob(**{**job.__dict__, "eval_examples": None})) as run:
        train_loop(run, progress=False)
    records = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds_per_step"] for r in records if "seconds_per_step" in r]
    timed = memory.step_seconds()[-args.steps:][2:-1]  # the training steps, less compiling and exporting ones
    phases = {p: {**memory.peaks[p], "median_seconds": phase_median(timed, p)} for p in PHASES if p in memory.peaks}
    return {"case": args.case, "steps": args.steps, "peak_rss_bytes": llm_kd._rss("VmHWM"),
            "import_rss_bytes": import_rss, "state_bytes": state, "floor_rss_bytes": import_rss + state,
            "seconds_per_step": seconds, "timed_steps": len(timed), "phases": phases, "at_peak": memory.at_peak}


def phase_median(steps: list[dict[str, float]], phase: str) -> float | None:
    """Median over ``steps`` of the seconds spent in ``phase`` (0 in a step without it); None without steps."""
    return statistics.median(step.get(phase, 0.0) for step in steps) if steps else None


def _report(result: dict) -> None:
    gib = 2**30
    print(f"\n{result['case']}: {result['steps']} steps, peak RSS {result['peak_rss_bytes'] / gib:.2f} GiB "
          f"(floor {result['floor_rss_bytes'] / gib:.2f}: imports {result['import_rss_bytes'] / gib:.2f} "
          f"+ weights, gradients, Adam moments {result['state_bytes'] / gib:.2f})")
    print(f"{'phase':16} {'peak RSS GiB':>12} {'peak in use GiB':>15} {'median s/step':>13}")
    for phase, peak in result["phases"].items():
        in_use = " " * 15 if peak["in_use"] is None else f"{peak['in_use'] / gib:15.2f}"
        median = "" if peak["median_seconds"] is None or phase == "setup" else f"{peak['median_seconds']:13.3f}"
        print(f"{phase:16} {peak['rss'] / gib:12.2f} {in_use} {median}")
    print(f"(median seconds over {result['timed_steps']} steps: all but the first two and the last)")
    at = result["at_peak"]
    parts = [f"{name.replace('_', ' ')} {at[name] / gib:.2f}" for name in
             ("heap_in_use", "heap_free", "mmapped", "python_arenas", "python_objects", "other_anon", "rss_file")
             if at.get(name) is not None]
    print(f"highest RSS sampled: {at['rss'] / gib:.2f} GiB in {at['phase']}: " + ", ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, default="kdistill_live")
    parser.add_argument("--steps", type=int, default=12)
    llm_kd.add_data_arguments(parser)
    llm_kd.add_recipe_arguments(parser)
    parser.add_argument("--out", default="runs/bench-memory-phases")
    parser.add_argument("--results", default="benchmarks/results/memory_phases.json")
    args = parser.parse_args()
    if not Path("/proc/self/statm").exists():
        sys.exit("skipped: needs Linux's /proc/self")
    llm_kd.require_data()
    result = _run(args)
    _report(result)
    path = Path(args.results)
    path.write_text(json.dumps({"config": vars(args), "commit": llm_kd._commit(), "versions": llm_kd._versions(),
                                "result": result}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
