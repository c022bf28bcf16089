"""The training loop, on Accelerate: read top to bottom, one phase at a time.

One optimizer step takes a *global batch* of ``per_device_train_batch_size × processes ×
gradient_accumulation_steps`` examples from a seeded permutation of the training set (a pure
function of seed, epoch and step, so resuming needs only the step), splits it into micro-batches
per process, counts each position kind over the whole global batch (all micro-batches, all
processes), and normalises every term by that count: the update is the same whether the batch
runs in one process, two, or in accumulation steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_model
from torch import Tensor, nn
from transformers import get_scheduler

from kdistill.distill.checkpoint import (
    TrainerState,
    best_path,
    checkpoint_dirs,
    load_checkpoint,
    save_best,
    save_checkpoint,
)
from kdistill.distill.compiled import compile_forward, eager_forward, uncompile
from kdistill.distill.distiller import (
    MODEL_INPUTS,
    Distiller,
    StepCounts,
    StudentModule,
    TrainingError,
    batch_counts,
    hard_ce,
    position_masks,
)
from kdistill.distill.memory import HeapTrims, return_free_memory
from kdistill.errors import ConfigError
from kdistill.models.lean import disable_lean_activations, enable_lean_activations
from kdistill.models.outputs import forward_outputs
from kdistill.recipe import TermSpec, TrainingSpec
from kdistill.signals.live import LiveTeachers

log = logging.getLogger(__name__)
LOWER_IS_BETTER = ("eval_loss", "perplexity")


@dataclass
class TrainJob:
    """Everything the loop needs; built from a recipe by :mod:`kdistill.distill.pipeline`."""

    student: nn.Module
    task: str
    teachers: LiveTeachers | None
    terms: list[TermSpec]
    train_examples: list[dict]
    eval_examples: list[dict] | None
    collator: Callable
    training: TrainingSpec
    run_dir: Path
    vocab_size: int | None = None


@dataclass
class TrainResult:
    steps: int
    stopped_early: bool
    best_step: int | None
    best_metric: float | None
    final_eval: dict
    train_seconds: float


def best_metric_name(training, task: str) -> str:
    """The evaluation metric that picks the exported weights: ``training.metric_for_best_model``,
    else accuracy (classification) or eval_loss."""
    return training.metric_for_best_model or ("accuracy" if task == "classification" else "eval_loss")


def make_accelerator(bf16: bool) -> Accelerator:
    """An Accelerator for this run (CPU when no GPU; bf16 autocast if asked).

    Accelerate keeps one process-wide state; it is reset first so that several runs with
    different precision can follow each other in one process (the process group stays)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if bf16 else "no")


# ---------------------------------------------------------------------------- data plan


def global_batch_ids(n_examples: int, step: int, steps_per_epoch: int, global_batch: int, seed: int) -> Tensor:
    """Example indices of optimizer step ``step``: a slice of epoch ``step // steps_per_epoch``'s permutation."""
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))
    return order[index * global_batch : (index + 1) * global_batch]


def micro_batch_ids(ids: Tensor, accumulation: int, world: int, rank: int) -> list[Tensor]:
    """This process's micro-batches of a global batch: (accumulation, world, per_device)[:, rank]."""
    return list(ids.reshape(accumulation, world, -1)[:, rank])


def _mask_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 101 + rank)


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, task: str, examples: list[dict], collator: Callable, batch_size: int,
             device: torch.device, seed: int, vocab_size: int | None = None) -> dict:
    """Mean loss over label positions (+ accuracy for classification, perplexity for LMs)."""
    was_training = model.training
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = collator(examples[start : start + batch_size], generator=_mask_generator(seed, -1, start, 0))
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
        outputs = forward_outputs(model, task, inputs, hidden_states=False, modules=[])
        mask = position_masks(batch, task)["labels"]
        n = int(mask.sum())
        loss_sum += hard_ce(task, model, outputs, batch, mask, 1.0, vocab_size).item()
        count += n
        if task == "classification":
            correct += int((outputs["logits"].argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    metrics = {"eval_loss": loss_sum / max(count, 1)}
    if task == "classification":
        metrics["accuracy"] = correct / max(count, 1)
    else:
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    return metrics


# ---------------------------------------------------------------------------- the loop


def train(job: TrainJob, *, resume: bool = False, accelerator: Accelerator | None = None,
          progress: bool = True, on_ready: Callable[[], None] | None = None) -> TrainResult:
    """Train ``job.student``; write checkpoints, ``metrics.jsonl`` and the exported student.

    ``on_ready`` runs on the main process once everything is set up (a probe batch through the
    student and teachers included), before anything is written: where a caller writes its own files."""
    cfg = job.training
    acc = accelerator or make_accelerator(cfg.bf16)
    world, rank, device = acc.num_processes, acc.process_index, acc.device
    torch.manual_seed(cfg.seed)
    return_free_memory()  # e.g. what loading the teacher and building the student left behind

    # -- data plan
    per_device, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    global_batch = per_device * world * accumulation
    steps_per_epoch = len(job.train_examples) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"training set has {len(job.train_examples)} examples, fewer than one global batch "
                          f"({per_device} per device × {world} processes × {accumulation} accumulation steps)")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)

    # -- student (+ feature projections), teachers, optimizer, schedule
    student = StudentModule(job.student, job.task).to(device).train()
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(job.student)
    if cfg.lean_activations:
        log.info("lean activations in %d student modules", enable_lean_activations(job.student))
    teachers = job.teachers.to(device) if job.teachers is not None else None
    teacher_models = getattr(teachers, "models", ())  # live teachers' models; none from a cache
    compiled = [compile_forward(model, job.task) for model in (job.student, *teacher_models)] if cfg.compile else []
    trims = (HeapTrims(job.student, teacher_models, hooks=not compiled)
             if cfg.trim_heap and device.type == "cpu" else None)
    distiller = Distiller(student, teachers, job.terms, job.task, job.vocab_size)
    probe = job.collator(job.train_examples[:per_device], generator=_mask_generator(cfg.seed, 0, 0, rank))
    with eager_forward(bool(compiled)):  # a no-grad probe: not worth a compile of its own
        distiller.build_projections({k: v.to(device) for k, v in probe.items()})
    no_decay = [p for n, p in student.named_parameters() if p.ndim < 2]
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate,
                                  fused=fused_adamw_supported(student.parameters()))
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    wrapped = acc.prepare(student)  # DDP across processes; the teachers are never wrapped
    distiller.student = wrapped

    if on_ready is not None and acc.is_main_process:
        on_ready()

    # -- resume
    state = TrainerState()
    ckpt_root = job.run_dir / "checkpoints"
    metrics_path = job.run_dir / "metrics.jsonl"
    if resume:
        found = checkpoint_dirs(ckpt_root)
        if not found:
            raise ConfigError(f"--resume: no checkpoint in {ckpt_root}")
        state = load_checkpoint(found[-1], student.model, student.projections, optimizer, scheduler)
        log.info("resumed from %s (step %d)", found[-1], state.step)
        if acc.is_main_process:
            _truncate_metrics(metrics_path, state.step)
    elif acc.is_main_process and metrics_path.exists():
        metrics_path.unlink()
    acc.wait_for_everyone()

    metrics_log = MetricsLog(metrics_path, acc.is_main_process)
    metric = best_metric_name(cfg, job.task)
    final_eval: dict = {}
    stopped_early = False
    bar = _Progress(total_steps, state.step, enabled=progress and acc.is_main_process)
    started, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
    window_step = state.step  # the logging window: tokens and time since the last record

    while state.step < total_steps:
        if trims is not None:
            trims.trim()  # what the last step freed (its gradients among them) leaves before this one
        # -- this step's micro-batches and the global counts that normalise every term
        ids = global_batch_ids(len(job.train_examples), state.step, steps_per_epoch, global_batch, cfg.seed)
        batches = []
        for j, micro in enumerate(micro_batch_ids(ids, accumulation, world, rank)):
            batch = job.collator([job.train_examples[i] for i in micro.tolist()],
                                 generator=_mask_generator(cfg.seed, state.step, j, rank))
            batches.append({k: v.to(device) for k, v in batch.items()})
        local = torch.tensor([[batch_counts(b, job.task)[k] for k in ("labels", "tokens", "examples")]
                              for b in batches], dtype=torch.float64, device=device).sum(0)
        totals = acc.reduce(local, reduction="sum") / world
        counts = StepCounts(*totals.tolist())

        # -- forward/backward over micro-batches (gradients sync on the last one only)
        step_values: dict[str, float] = {}
        for j, batch in enumerate(batches):
            sync = nullcontext() if j == accumulation - 1 else acc.no_sync(wrapped)
            with sync, acc.autocast():
                loss, values = distiller(batch, counts)
                _check_finite(state.step, values, batch)
                acc.backward(loss)
            for label, value in values.items():
                step_values[label] = step_values.get(label, 0.0) + value.item()
            step_values["loss"] = step_values.get("loss", 0.0) + loss.item()
            window_tokens += int(batch["attention_mask"].sum())
        if cfg.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

        # -- log, evaluate, checkpoint
        step_values = {k: v for k, v in zip(step_values, acc.reduce(
            torch.tensor(list(step_values.values()), device=device), reduction="mean").tolist())}
        if state.step % cfg.logging_steps == 0 or state.step == total_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = acc.reduce(torch.tensor(float(window_tokens), device=device), "sum").item() / max(elapsed, 1e-9)
            record = {"step": state.step, **step_values, "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": tokens_per_s, "seconds_per_step": elapsed / (state.step - window_step)}
            if cfg.max_grad_norm is not None:
                record["grad_norm"] = grad_norm
            metrics_log.write(record)
            window_tokens, window_start, window_step = 0, time.perf_counter(), state.step
            bar.tokens_per_s = tokens_per_s
        bar.update(state.step, step_values)

        if job.eval_examples and ((cfg.eval_steps and state.step % cfg.eval_steps == 0) or state.step == total_steps):
            with eager_forward(bool(compiled)):  # its own shapes and grad mode would compile again
                final_eval = evaluate(student.model, job.task, job.eval_examples, job.collator,
                                      cfg.per_device_eval_batch_size, device, cfg.seed, job.vocab_size)
            metrics_log.write({"step": state.step, **final_eval})
            bar.note(final_eval)
            if metric not in final_eval:
                raise ConfigError(f"training.metric_for_best_model {metric!r} is not one of {sorted(final_eval)}")
            value = final_eval[metric]
            better = state.best_metric is None or (
                value < state.best_metric if metric in LOWER_IS_BETTER else value > state.best_metric)
            if better:
                state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
                if acc.is_main_process:
                    save_best(ckpt_root, state.step, student.model)
            else:
                state.evals_without_improvement += 1
            if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
                stopped_early = True

        if cfg.save_steps and (state.step % cfg.save_steps == 0 or stopped_early or state.step == total_steps):
            if acc.is_main_process:
                save_checkpoint(ckpt_root, state, student.model, student.projections, optimizer, scheduler,
                                cfg.save_total_limit)
            acc.wait_for_everyone()
        if stopped_early:
            break
    bar.close()
    metrics_log.close()
    for module in compiled:
        uncompile(module)
    if trims is not None:
        trims.remove()

    # -- export: the best evaluated weights if any, else the final ones
    acc.wait_for_everyone()
    if state.best_step is not None and best_path(ckpt_root, state.best_step).exists():
        load_model(student.model, str(best_path(ckpt_root, state.best_step)))
    if cfg.gradient_checkpointing:
        disable_gradient_checkpointing(job.student)
    if cfg.lean_activations:
        disable_lean_activations(job.student)
    if acc.is_main_process:
        export_student(student.model, job.run_dir / "student")
    acc.wait_for_everyone()
    return TrainResult(state.step, stopped_early, state.best_step, state.best_metric, final_eval,
                       time.perf_counter() - started)


# ---------------------------------------------------------------------------- helpers


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Keep only each layer's input in forward and recompute the layer in backward
    (``transformers``' non-reentrant checkpointing): activation memory drops from all of a layer's
    intermediates to one (B, L, H) tensor per layer, for about one more forward of the layers.
    Hooked submodule outputs and hidden states stay usable by the loss."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"training.gradient_checkpointing: {type(model).__name__} does not support it")
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_gradient_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def fused_adamw_supported(params) -> bool:
    """Whether ``AdamW(fused=True)`` takes these parameters: floating point, all on CPU or all on
    CUDA. The fused kernel updates each parameter in one pass with no temporaries (the default
    per-tensor loop allocates a parameter-sized ``denom``), as ``transformers``' default optimizer
    ``adamw_torch_fused`` does."""
    params = list(params)
    devices = {p.device.type for p in params}
    return bool(params) and len(devices) == 1 and devices <= {"cpu", "cuda"} and all(
        p.is_floating_point() for p in params)


def _check_finite(step: int, values: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
    for label, value in values.items():
        if not torch.isfinite(value):
            ids = batch["example_ids"].tolist()
            shown = ", ".join(map(str, ids[:8])) + (" ..." if len(ids) > 8 else "")
            raise TrainingError(f"step {step + 1}: loss term {label} is {value.item()} on the batch of examples "
                                f"[{shown}]; the last checkpoint is intact")


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (and TensorBoard scalars when ``tensorboard`` is
    installed), on the main process only."""

    def __init__(self, path: Path, main: bool) -> None:
        self.path, self.main, self.writer = path, main, None
        if main:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = "eval/" if any(k.startswith("eval_") for k in record) else "train/"
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def export_student(model: nn.Module, target: Path) -> None:
    """``save_pretrained`` into a temporary directory, then swap it into place."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


class _Progress:
    """A rich progress bar with the loss terms; silent when disabled (other ranks, tests)."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[terms]}"))
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, terms="")

    tokens_per_s: float | None = None

    def update(self, step: int, values: dict[str, float]) -> None:
        if self.progress is not None:
            terms = " ".join(f"{k} {v:.4f}" for k, v in values.items())
            if self.tokens_per_s is not None:
                terms += f" | {self.tokens_per_s:,.0f} tok/s"
            self.progress.update(self.task, completed=step, terms=terms)

    def note(self, metrics: dict) -> None:
        if self.progress is not None:
            self.progress.console.print("eval: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


