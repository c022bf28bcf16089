"""benchmarks/memory_phases.py: each sample of memory, and each second, is put down to the phase of the step running then."""

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from memory_phases import PHASES, PhaseMemory, phase_labels, phase_median, python_heap  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="samples Linux's /proc/self")


def test_every_phase_is_sampled_and_a_teacher_allocation_peaks_in_teacher_forward(tiny_causal_job, monkeypatch):
    from kdistill.distill.trainer import train
    from kdistill.signals.live import LiveTeachers

    forward = LiveTeachers.__call__

    def heavy_forward(self, *args, **kwargs):  # 256 MiB touched and held for a while: far above the tiny models
        block = torch.ones(64 * 2**20)
        time.sleep(0.05)
        del block
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LiveTeachers, "__call__", heavy_forward)
    _, job = tiny_causal_job(3)
    with PhaseMemory(interval=0.001) as memory, phase_labels(memory, job) as run:
        train(run, progress=False)
    assert set(memory.peaks) == set(PHASES)
    assert memory.at_peak["phase"] == "teacher forward"
    teacher = memory.peaks["teacher forward"]["rss"]
    assert all(teacher > peak["rss"] + 128 * 2**20 for phase, peak in memory.peaks.items() if phase != "teacher forward")
    assert memory.at_peak["rss"] == teacher
    steps = memory.step_seconds()[-3:]  # the three training steps: the held 50 ms is in each teacher forward
    assert all(step["teacher forward"] >= 0.05 and step["student forward"] < 0.05 for step in steps)
    assert phase_median(steps, "teacher forward") >= 0.05


def test_heap_trims_count_as_the_start_of_their_step(tiny_causal_job, monkeypatch):
    """With ``trim_heap`` each step starts with a trim: its time is the step's ``collate``; the trims
    that the hooks make inside the forwards and backward neither start a step nor relabel it."""
    from kdistill.distill.memory import HeapTrims
    from kdistill.distill.trainer import TrainJob, train

    trim = HeapTrims.trim

    def slow_trim(self):
        time.sleep(0.03)
        trim(self)

    monkeypatch.setattr(HeapTrims, "trim", slow_trim)
    _, job = tiny_causal_job(3)
    job = TrainJob(**{**job.__dict__, "training": job.training.model_copy(update={"trim_heap": True})})
    with PhaseMemory() as memory, phase_labels(memory, job) as run:
        train(run, progress=False)
    steps = memory.step_seconds()[-3:]
    for step in steps:
        assert set(step) == {"collate", "student forward", "teacher forward", "loss", "backward", "optimizer"}
        assert 0.03 <= step["collate"] < 0.06 and step["optimizer"] < 0.03
        assert step["student forward"] >= 0.03 and step["backward"] >= 0.03  # the hooks' trims


def test_a_phase_shorter_than_the_interval_is_sampled():
    """Each change of phase takes a sample: a tiny job's collate lasts less than a millisecond."""
    with PhaseMemory(interval=60.0) as memory:  # the thread samples once, at the start
        memory.phase = "collate"
        memory.phase = "loss"
    assert {"collate", "loss"} <= set(memory.peaks) <= {"setup", "collate", "loss"}
    assert memory.peaks["collate"]["rss"] > 0


def test_python_objects_are_counted_apart_from_the_other_anonymous_memory():
    """~70 MiB of small Python objects show in Python's arenas at the next change of phase, and
    not in the anonymous memory left over (which is found by difference)."""
    if python_heap() is None:
        pytest.skip("no pymalloc report in this interpreter")
    with PhaseMemory(interval=60.0) as memory:  # the thread samples once, at the start
        memory.phase = "collate"
        before = dict(memory.at_peak)
        objects = [(i, str(i)) for i in range(10**6, 2 * 10**6)]  # a tuple, an int and a str each: pymalloc's
        memory.phase = "loss"
        after = memory.at_peak
    assert len(objects) == 10**6 and after["phase"] == "loss"
    assert after["python_objects"] <= after["python_arenas"]
    assert after["python_arenas"] - before["python_arenas"] >= 64 * 2**20
    assert after["python_objects"] - before["python_objects"] >= 64 * 2**20
    if "other_anon" in after:  # glibc
        assert abs(after["other_anon"] - before["other_anon"]) < 16 * 2**20


def test_step_seconds_split_at_collate_and_sum_each_phase():  # collate twice: the heap trim, then the collator
    with PhaseMemory() as memory:
        for _ in range(2):
            for phase, held in (("collate", 0.0), ("collate", 0.0), ("student forward", 0.02), ("loss", 0.0),
                                ("student forward", 0.01), ("optimizer", 0.0)):
                memory.phase = phase
                time.sleep(held)
    setup, *steps = memory.step_seconds()
    assert set(setup) == {"setup"} and len(steps) == 2
    for step in steps:
        assert set(step) == {"collate", "student forward", "loss", "optimizer"}
        assert 0.03 <= step["student forward"] < 0.03 + 0.02  # both spans summed
    assert phase_median(steps, "backward") == 0.0 and phase_median([], "loss") is None


def test_the_trainer_functions_are_restored_afterwards(tiny_causal_job):
    import accelerate

    import kdistill.distill.distiller as distiller_module
    from kdistill.distill.memory import HeapTrims
    from kdistill.signals.live import LiveTeachers

    def patched():
        return [distiller_module.Distiller.__call__, distiller_module.chunked_distribution_losses,
                accelerate.Accelerator.backward, torch.nn.utils.clip_grad_norm_, torch.optim.Optimizer.zero_grad,
                LiveTeachers.__call__, HeapTrims.trim]

    before = patched()
    _, job = tiny_causal_job(3)
    with PhaseMemory() as memory, phase_labels(memory, job) as run:
        assert distiller_module.Distiller.__call__ is not before[0]
        assert run.collator is not job.collator
    assert patched() == before
