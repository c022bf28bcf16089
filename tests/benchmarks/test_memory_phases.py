"""benchmarks/memory_phases.py: each sample of memory is put down to the phase of the step running then."""

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from memory_phases import PHASES, PhaseMemory, phase_labels  # noqa: E402

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


def test_the_trainer_functions_are_restored_afterwards(tiny_causal_job):
    import accelerate

    import kdistill.distill.distiller as distiller_module
    from kdistill.signals.live import LiveTeachers

    before = [distiller_module.Distiller.__call__, distiller_module.chunked_distribution_losses,
              accelerate.Accelerator.backward, torch.nn.utils.clip_grad_norm_, torch.optim.Optimizer.zero_grad,
              LiveTeachers.__call__]
    _, job = tiny_causal_job(3)
    with PhaseMemory() as memory, phase_labels(memory, job) as run:
        assert distiller_module.Distiller.__call__ is not before[0]
        assert run.collator is not job.collator
    after = [distiller_module.Distiller.__call__, distiller_module.chunked_distribution_losses,
             accelerate.Accelerator.backward, torch.nn.utils.clip_grad_norm_, torch.optim.Optimizer.zero_grad,
             LiveTeachers.__call__]
    assert after == before
