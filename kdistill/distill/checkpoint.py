"""Training checkpoints: written atomically, read back exactly, the newest K kept.

``checkpoints/step-000120/`` holds ``student.safetensors`` (the student's weights, tied tensors
once), ``projections.safetensors`` (feature projections), ``optimizer.pt``, ``scheduler.pt``,
``rng.pt`` (torch CPU RNG state) and ``trainer_state.json`` (step, best metric, early-stopping
count); ``best-step-N.safetensors`` beside them hold the best evaluated weights (the ones a run
or a kept checkpoint refers to), so a resumed run exports the same best model. The data position is derived from the step (the sampler is a pure function of seed,
epoch and step). A checkpoint is written into ``.tmp-step-000120`` and renamed when complete, so
an interrupted write never leaves a checkpoint that looks whole. State files are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from kdistill.errors import ConfigError

_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    root: Path,
    state: TrainerState,
    model: nn.Module,
    projections: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    keep: int,
) -> Path:
    """Write checkpoint ``step-<state.step>`` atomically; delete all but the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "student.safetensors"))
    save_model(projections, str(tmp / "projections.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(torch.get_rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    _prune_best(root, state.best_step)
    return final


def best_path(root: Path, step: int) -> Path:
    """Where the weights of the best evaluation, made at ``step``, are kept."""
    return root / f"best-step-{step:06d}.safetensors"


def save_best(root: Path, step: int, model: nn.Module) -> None:
    """Keep the weights of a new best evaluation (temp file + rename)."""
    path = best_path(root, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    save_model(model, str(tmp))
    os.replace(tmp, path)


def _prune_best(root: Path, current_best: int | None) -> None:
    """Delete best-weight files that neither the run nor a kept checkpoint refers to."""
    wanted = {current_best}
    for ckpt in checkpoint_dirs(root):
        wanted.add(json.loads((ckpt / "trainer_state.json").read_text()).get("best_step"))
    for path in root.glob("best-step-*.safetensors"):
        if int(path.stem.split("-")[-1]) not in wanted:
            path.unlink()


def load_checkpoint(
    path: Path, model: nn.Module, projections: nn.Module, optimizer: torch.optim.Optimizer, scheduler
) -> TrainerState:
    """Restore everything :func:`save_checkpoint` wrote; return the trainer state."""
    try:
        load_model(model, str(path / "student.safetensors"))
        load_model(projections, str(path / "projections.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        return TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as error:  # a truncated or corrupt file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot resume from {path}: {first}") from None
