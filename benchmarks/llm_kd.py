"""Benchmark: causal-LM KD four ways, same teacher, student, data, batch, optimizer and steps.

Teacher: the packaged Gemma 3 270M, fp32 (``--teacher-dtype bfloat16``: its body in bf16, head and
logits fp32, see ``kdistill.models.precision``; TRL gets the same teacher object). Student: 6 of
its 18 layers (uniform). Data: SST-2 sentences (``../shared/data/sst2/sentences-train.txt``,
shuffled with a fixed seed) packed into rows of up to ``--max-length`` Gemma tokens (so a batch
is ~``batch × max_length`` real tokens, as in LM pre-training); a held-out set of rows from
sentences not used for training. Forward KL at T = 1 (+ hard-label CE, weight ``--ce-weight``,
for kdistill), AdamW at a constant learning rate, gradients clipped at 1.0.

    (a) kdistill, live teacher          (chunked loss: no B×L×V logits)
    (b) kdistill, from a top-64 cache   (teacher run once by ``kdistill cache`` in a process of its own
                                         first, as a user runs it; time reported apart)
    (c) plain SFT of the student        (cross-entropy, no teacher)
    (d) TRL's GKDTrainer, off-policy (lmbda = 0, beta = 0: forward KL), TRL's defaults otherwise
        except fp32 on CPU as for (a)–(c) (TRL's default is bf16 mixed precision: ``--bf16``)
    (e) only with ``--cases ...,trl_sft``: TRL's SFTTrainer on the same student, settings as (d), no
        teacher: what plain fine-tuning of the student costs in TRL (its loss takes the student's
        log-probabilities from TRL's fused, chunked head, no B×L×V logits)

``--bf16`` trains the student under bf16 mixed precision in all four cases (kdistill's
``training.bf16``, TRL's ``bf16``, which is TRL's own default; autocast on a CPU, bf16 GEMMs on
AMX where the CPU has it); give it with ``--teacher-dtype bfloat16`` so that the teacher's weights
are stored in bf16 too rather than cast at every forward.

Importing kdistill bounds oneDNN's per-shape caches (``kdistill.onednn``: bf16 GEMMs otherwise add
resident memory with every new batch shape); TRL's process keeps the sizes the benchmark was
started with (the libraries' default of 1,024 entries unless set), as a TRL user gets them.

``--compile`` runs the student, and the live teacher where there is one, through ``torch.compile``
in all four cases (kdistill's ``training.compile``; TRL's ``torch_compile``, whose accelerator
compiles the teacher too). ``benchmarks/compile_gain.py`` measures the gain paired within one run.

``--gradient-checkpointing`` turns on activation recomputation for the student in all four cases
(kdistill's ``training.gradient_checkpointing``, TRL's ``gradient_checkpointing``; both
non-reentrant). ``--trim-heap`` turns on kdistill's ``training.trim_heap`` in (a)–(c) (freed heap
pages go back to the OS within each step; ``kdistill.distill.memory.HeapTrims``); TRL has no such
setting.

Two student vocabularies (``--vocab``):
- ``full``: the student keeps Gemma's 262,144-token embedding/head, as TRL needs;
- ``trimmed``: the ``recipes/gemma-kd.yaml`` student, its vocabulary trimmed to the tokens of
  the data (``vocab: {keep: corpus}``). Every case trains this same trimmed student. TRL compares
  teacher and student logits position by position, so it gets the teacher trimmed to the same
  kept ids (embedding and head rows): its distribution renormalised over the kept tokens, the
  same target kdistill's live teacher uses. The cache stores the full-vocabulary top-64, mapped
  into the kept ids (the rest of the mass is the tail bucket).

Each case runs in its own process. Reported: seconds per optimizer step (median, first step
excluded) and tokens/s (non-padding tokens per step ÷ that), the peak RSS of the training phase
(``VmHWM`` reset after the models are built, so model loading and conversion do not count), then
held-out perplexity, teacher–student KL and top-1 agreement (against the untrimmed teacher) after
the same number of steps.

Next to each case, what one step must cost whatever trainer runs it (``benchmarks/floors.py``;
measured after the quality evaluation, with one more step): its matmul FLOPs (counted by
``torch.utils.flop_counter`` over forward, backward and the teacher), the floor time at the best
GEMM rate this machine reached at the step's own shapes, and the floor memory: the process after
its imports plus the teacher's weights and the student's weights, gradients and Adam moments.
From these, the most any trainer of that case could gain over TRL's measured step at the same
precision, and the least memory it could peak at.

    python benchmarks/llm_kd.py                                 # both vocabularies (50–60 min, 2 CPU cores)
    python benchmarks/llm_kd.py --vocab trimmed --steps 10      # a quick look
    python benchmarks/llm_kd.py --vocab trimmed --teacher-dtype bfloat16 --results benchmarks/results/llm_kd-bf16-teacher.json
    python benchmarks/llm_kd.py --vocab trimmed --trim-heap --bf16 --teacher-dtype bfloat16 --results benchmarks/results/llm_kd-bf16.json
    python benchmarks/llm_kd.py --vocab trimmed --bf16 --teacher-dtype bfloat16 --compile --results benchmarks/results/llm_kd-bf16-compile.json
    python benchmarks/llm_kd.py --vocab trimmed --gradient-checkpointing --results benchmarks/results/llm_kd-checkpointing.json
    python benchmarks/llm_kd.py --vocab trimmed --trim-heap --results benchmarks/results/llm_kd-trim-heap.json
    python benchmarks/llm_kd.py --vocab full --results benchmarks/results/llm_kd-full.json   # ~30 min

Targets (issue 4): (b) ≤ 1.15× the step time of (c); (a) and (b) ≥ 1.5× the tokens/s of (d) at
≤ 0.5× its peak memory; the KD students beat the SFT student on held-out perplexity.
Needs TRL for case (d): ``pip install -e '.[bench]'``. Prints a table per vocabulary and writes
``benchmarks/results/llm_kd.json`` (with the commit and the torch/transformers/accelerate/TRL versions).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

from floors import count_flops, gemm_rate, gemm_shapes, training_state_bytes
from packing import pack_sentences

DATA = Path("../shared/data/sst2/sentences-train.txt")
CASES = ("kdistill_live", "kdistill_cache", "sft", "trl_gkd", "trl_sft")
DEFAULT_CASES = CASES[:4]
TRL_CASES = ("trl_gkd", "trl_sft")
TEACHER = "gemma-3-270m"


def _status(*fields: str) -> dict[str, int]:
    """Bytes of the given ``/proc/self/status`` fields (kB there), from one read; 0 for a field not there."""
    values = dict.fromkeys(fields, 0)
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in values:
            values[name] = int(rest.split()[0]) * 1024
    return values


def _rss(field: str) -> int:
    return _status(field)[field]


def _reset_peak_rss() -> None:
    """Return freed heap memory to the OS (as kdistill's trainer does when it starts; done here
    for every case, TRL's too), then start ``VmHWM`` again from the current RSS (Linux: write 5
    to clear_refs)."""
    from kdistill.distill.memory import return_free_memory

    return_free_memory()
    Path("/proc/self/clear_refs").write_text("5")


def _write_data(out: Path, n_train: int, n_held: int, max_length: int) -> tuple[Path, Path]:
    """Pack shuffled sentences into rows of ≤ max_length − 1 Gemma tokens (room for <bos>)."""
    from kdistill.models.resolve import load_tokenizer

    sentences = [line.partition(" ")[2].strip() for line in DATA.read_text().splitlines()]
    random.Random(7).shuffle(sentences)
    rows = pack_sentences(load_tokenizer(TEACHER), sentences, max_length, n_train + n_held)
    if len(rows) < n_train + n_held:
        sys.exit(f"{DATA} has too few sentences for {n_train + n_held} rows of {max_length} tokens")
    out.mkdir(parents=True, exist_ok=True)
    train, held = out / "train.jsonl", out / "held_out.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows[:n_train]))
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows[n_train:]))
    return train, held


def _recipe_text(case: str, vocab: str, out: Path, train: Path, held: Path, args) -> str:
    if case in ("sft", "trl_sft"):
        objective = "[{kind: ce}]"
    elif args.ce_weight:
        objective = f"[{{kind: forward_kl}}, {{kind: ce, weight: {args.ce_weight}}}]"
    else:
        objective = "[{kind: forward_kl}]"
    signal = "signal: {source: cache, k: 64, batch_size: 8}\n" if case == "kdistill_cache" else ""
    trim = ", vocab: {keep: corpus}" if vocab == "trimmed" else ""
    return f"""
name: llm-kd-{vocab}-{case}
task: causal
output_dir: {out / vocab / case}
teacher: {{model: {TEACHER}, dtype: {args.teacher_dtype}}}
student:
  init_from_teacher: {{strategy: uniform, num_layers: 6{trim}}}
data:
  train: {{source: {train}}}
  validation: {{source: {held}}}
  max_length: {args.max_length}
objective: {objective}
{signal}training:
  per_device_train_batch_size: {args.batch}
  learning_rate: {args.lr}
  max_steps: {args.steps}
  lr_scheduler_type: constant
  max_grad_norm: 1.0
  gradient_checkpointing: {str(args.gradient_checkpointing).lower()}
  trim_heap: {str(args.trim_heap).lower()}
  bf16: {str(args.bf16).lower()}
  compile: {str(args.compile).lower()}
  logging_steps: 1
  seed: 0
"""


def _teacher_id_examples(examples: list[dict], plan) -> list[dict]:
    """Held-out examples in the teacher's ids (a trimmed student's ids mapped back by ``new_to_old``)."""
    if plan is None:
        return examples
    table = plan.new_to_old.tolist()
    return [{**ex, "input_ids": [table[i] for i in ex["input_ids"]],
             "labels": [table[i] if i >= 0 else i for i in ex["labels"]]} for ex in examples]


def _run_case(case: str, vocab: str, args, out: Path, train: Path, held: Path, queue) -> None:
    if case in TRL_CASES:  # before this process's first bf16 GEMM, when the caches read them
        os.environ.update(args.trl_onednn_env)
    import torch

    torch.set_num_threads(args.threads)
    from kdistill.data.collate import Collator
    from kdistill.distill.pipeline import build_job
    from kdistill.distill.trainer import TrainJob
    from kdistill.distill.trainer import train as train_loop
    from kdistill.eval.quality import VocabMap, lm_quality
    from kdistill.models.resolve import load_model, load_tokenizer
    from kdistill.recipe import parse_recipe

    import_rss = _rss("VmRSS")  # torch, transformers and kdistill imported: the process's own footprint
    recipe = parse_recipe(_recipe_text(case, vocab, out, train, held, args))
    cache_seconds = None
    if case == "kdistill_cache":  # `kdistill cache`, then training in a process of its own, as a user runs them
        shutil.rmtree(recipe.cache_dir, ignore_errors=True)  # a complete cache left by an earlier run would only be checked
        cache_seconds = write_cache_apart(recipe, args.threads)
    job, _, sizes, extras = build_job(recipe)
    plan = extras["vocab_plan"]
    tokens_per_row = statistics.fmean(sum(ex["attention_mask"]) for ex in job.train_examples)
    if case in TRL_CASES:
        step_times = _train_trl(case, job, args, out / vocab, args.steps)
    else:
        _reset_peak_rss()
        train_loop(TrainJob(**{**job.__dict__, "eval_examples": None}), progress=False)
        records = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
        step_times = [r["seconds_per_step"] for r in records if "seconds_per_step" in r][1:]
    peak = _rss("VmHWM")
    per_step = statistics.median(step_times)

    teacher = load_model(TEACHER, "causal")
    vocab_map = None if plan is None else VocabMap.from_new_to_old(plan.new_to_old.tolist(), plan.old_size)
    held_out = _teacher_id_examples(job.eval_examples, plan)
    quality = lm_quality(teacher, job.student, "causal", held_out, Collator(load_tokenizer(TEACHER), "causal"),
                         vocab_map=vocab_map, batch_size=8)
    floors = _floors(case, job, args, out / vocab, import_rss)
    queue.put({"vocab": vocab, "case": case, "student_vocab": job.student.config.vocab_size,
               "student_params": sizes["student"]["total"], "seconds_per_step": per_step,
               "tokens_per_step": tokens_per_row * args.batch, "tokens_per_s": tokens_per_row * args.batch / per_step,
               "peak_rss_bytes": peak, "cache_seconds": cache_seconds,
               "student_perplexity": quality["student"]["perplexity"],
               "teacher_perplexity": quality["teacher"]["perplexity"],
               "kl": quality["vs_teacher"]["kl"], "agreement": quality["vs_teacher"]["agreement"],
               **floors, "quality": quality})


def _floors(case: str, job, args, out: Path, import_rss: int) -> dict:
    """What one step must cost whatever the trainer: its matmul FLOPs (one more step, counted), the
    floor time at this machine's best GEMM rate, and the floor memory (process + training state).

    Run after the quality evaluation: the counted step trains the student once more."""
    import torch

    from kdistill.distill.trainer import TrainJob
    from kdistill.distill.trainer import train as train_loop

    teachers = list(getattr(job.teachers, "models", ()))  # live teachers; none for the cache and SFT
    state = training_state_bytes(job.student, teachers)
    if case in TRL_CASES:
        flops = count_flops(lambda: _train_trl(case, job, args, out / "flops", 1))
    else:
        one_step = TrainJob(**{**job.__dict__, "training": job.training.model_copy(update={"max_steps": 1}),
                               "run_dir": out / f"{case}-flops", "eval_examples": None})
        flops = count_flops(lambda: train_loop(one_step, progress=False))
    cfg = job.student.config
    q_width = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    shapes = gemm_shapes(cfg.hidden_size, (cfg.intermediate_size, q_width, cfg.vocab_size), args.batch * args.max_length)
    bf16 = args.bf16 or args.teacher_dtype == "bfloat16"
    dtypes = (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)
    rate = max(gemm_rate(shapes, dtype) for dtype in dtypes)
    return {"step_flops": flops, "gemm_flops_per_s": rate,
            "import_rss_bytes": import_rss, "state_bytes": state, "floor_rss_bytes": import_rss + state}


def write_cache_apart(recipe, threads: int) -> float:
    """``kdistill cache`` for ``recipe`` in a process of its own (as a user runs it); its seconds.

    A complete cache is only checked. Exits if the writer fails."""
    ctx = mp.get_context("spawn")
    seconds = ctx.Queue()
    writer = ctx.Process(target=_write_cache, args=(recipe, threads, seconds))
    writer.start()
    writer.join()
    if writer.exitcode != 0:
        sys.exit(f"kdistill cache failed (exit code {writer.exitcode})")
    return seconds.get()


def write_trimmed_cache(args, out: Path, train: Path, held: Path) -> None:
    """The trimmed-vocabulary cache case's top-64 cache for ``args`` (a process of its own; skipped when complete)."""
    from kdistill.recipe import parse_recipe

    recipe = parse_recipe(_recipe_text("kdistill_cache", "trimmed", out, train, held, args))
    write_cache_apart(recipe, args.threads)


def _write_cache(recipe, threads: int, seconds) -> None:
    import torch

    torch.set_num_threads(threads)
    from kdistill.distill.pipeline import run_cache

    start = time.perf_counter()
    run_cache(recipe)
    seconds.put(time.perf_counter() - start)


def _train_trl(case: str, job, args, out: Path, steps: int, tokenizer: str = TEACHER) -> list[float]:
    """TRL's GKDTrainer (``trl_gkd``) or SFTTrainer (``trl_sft``) on the same student, examples,
    collator and optimizer settings, for ``steps`` steps; the step times. ``tokenizer``: the model
    whose tokenizer TRL is given (the examples are tokenized already)."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdistill.models.resolve import load_tokenizer

    rows = [{k: ex[k] for k in ("input_ids", "attention_mask", "labels", "example_id")} for ex in job.train_examples]
    settings = dict(output_dir=str(out / case), per_device_train_batch_size=args.batch, learning_rate=args.lr,
                    max_steps=steps, lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0,
                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=args.bf16,
                    torch_compile=args.compile, gradient_checkpointing=args.gradient_checkpointing,
                    gradient_checkpointing_kwargs={"use_reentrant": False}, seed=0, dataloader_num_workers=0,
                    remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                    max_length=args.max_length)
    if case == "trl_gkd":
        # the recipe's live teacher, trimmed by build_job to the student's kept ids when there is a plan
        (teacher,) = job.teachers.models
        kind, extra = GKDTrainer, {"teacher_model": teacher,
                                   "args": GKDConfig(lmbda=0.0, beta=0.0, temperature=1.0, **settings)}
    else:
        kind, extra = SFTTrainer, {"args": SFTConfig(**settings)}
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    def collate(batch):
        return {k: v for k, v in job.collator(batch).items() if k != "example_ids"}

    trainer = kind(model=job.student, train_dataset=datasets.Dataset.from_list(rows),
                   processing_class=load_tokenizer(tokenizer), data_collator=collate, callbacks=[StepTimer()], **extra)
    _reset_peak_rss()
    trainer.train()
    torch.manual_seed(0)
    return times[1:] or times


def _best_gemm_rate(rows: list[dict]) -> float:
    """The best of the cases' GEMM timings (each case times them in its own process): the rate of every floor."""
    return max((r["gemm_flops_per_s"] for r in rows if "error" not in r), default=1.0)


def _report(vocab: str, rows: list[dict], args) -> dict[str, bool]:
    ok = {r["case"]: r for r in rows if "error" not in r}
    first = next(iter(ok.values()), {})
    rate = _best_gemm_rate(rows)
    print(f"\n{vocab} vocabulary (student {first.get('student_vocab', '?')} tokens, "
          f"{first.get('student_params', 0) / 1e6:.1f}M parameters): {args.train} rows × ≤{args.max_length} tokens, "
          f"batch {args.batch}, {args.steps} steps, CPU {args.threads} threads")
    print(f"{'case':16} {'s/step':>7} {'tok/s':>7} {'peak RSS GiB':>12} {'held-out ppl':>12} {'KL':>7} {'top-1':>6} "
          f"{'GFLOP/step':>10} {'floor s':>7} {'floor GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:16} {r['error']}")
            continue
        print(f"{r['case']:16} {r['seconds_per_step']:7.2f} {r['tokens_per_s']:7.0f} "
              f"{r['peak_rss_bytes'] / 2**30:12.2f} {r['student_perplexity']:12.1f} {r['kl']:7.3f} {r['agreement']:6.3f} "
              f"{r['step_flops'] / 1e9:10.0f} {r['step_flops'] / rate:7.2f} {r['floor_rss_bytes'] / 2**30:9.2f}")
    if ok:
        print(f"{'teacher':16} {'':7} {'':7} {'':12} {first['teacher_perplexity']:12.1f}")
    targets = {}
    if {"kdistill_cache", "sft"} <= ok.keys():
        targets["cache_step_le_1.15x_sft"] = ok["kdistill_cache"]["seconds_per_step"] <= 1.15 * ok["sft"]["seconds_per_step"]
    for case in ("kdistill_live", "kdistill_cache"):
        if case in ok and "trl_gkd" in ok:
            trl = ok["trl_gkd"]
            targets[f"{case}_tokens_ge_1.5x_trl"] = ok[case]["tokens_per_s"] >= 1.5 * trl["tokens_per_s"]
            targets[f"{case}_memory_le_0.5x_trl"] = ok[case]["peak_rss_bytes"] <= 0.5 * trl["peak_rss_bytes"]
        if case in ok and "sft" in ok:
            targets[f"{case}_ppl_below_sft"] = ok[case]["student_perplexity"] < ok["sft"]["student_perplexity"]
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))
    if "trl_gkd" in ok:
        trl = ok["trl_gkd"]
        print(f"floors (best GEMM rate {rate / 1e9:.0f} GFLOP/s; "
              "process after imports + weights, gradients and Adam moments):")
        for case in ("kdistill_live", "kdistill_cache"):
            if case in ok:
                r = ok[case]
                print(f"  {case}: at most {trl['seconds_per_step'] * rate / r['step_flops']:.2f}× TRL's tokens/s "
                      f"(target 1.5×), at least {r['floor_rss_bytes'] / trl['peak_rss_bytes']:.2f}× its peak RSS "
                      f"(target ≤ 0.5×)")
    return targets


def _versions() -> dict:
    """The versions of the libraries whose speed and numerics the results depend on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "accelerate", "trl"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _commit() -> str | None:
    """The checked-out commit (``+dirty`` with uncommitted changes), or None outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def require_data() -> None:
    """Exit with a one-line reason where the SST-2 sentences this benchmark (and those built on it) read are absent."""
    if not DATA.exists():
        sys.exit(f"skipped: {DATA} not found (the benchmark reads SST-2 from ../shared/data)")


def chosen_cases(text: str, cases: tuple[str, ...]) -> list[str]:
    """``--cases`` (comma-separated) as a list; exits with a one-line reason if one is not in ``cases``."""
    chosen = text.split(",")
    if unknown := sorted(set(chosen) - set(cases)):
        sys.exit(f"--cases: unknown case {unknown[0]!r} (choose from {', '.join(cases)})")
    return chosen


def add_data_arguments(parser) -> None:
    """The data, batch and thread options every benchmark built on this one shares."""
    parser.add_argument("--train", type=int, default=480, help="training rows")
    parser.add_argument("--held-out", type=int, default=48, help="held-out rows")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)


def add_recipe_arguments(parser) -> None:
    """The training settings :func:`_recipe_text` reads (beyond the data and ``--steps``)."""
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--ce-weight", type=float, default=1.0,
                        help="weight of the hard-label CE added to forward KL in (a) and (b), as in "
                             "recipes/gemma-kd.yaml (0: KL only, as TRL's GKD loss)")
    parser.add_argument("--teacher-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the teacher's precision (recipe teacher.dtype) for every case, TRL's included: "
                             "bfloat16 runs its body in bf16, head and logits in fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute the student's activations in backward, in every case (TRL's included)")
    parser.add_argument("--trim-heap", action="store_true",
                        help="kdistill's training.trim_heap in (a)–(c): freed heap pages go back within each step "
                             "(TRL has no such setting)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the student and the live teacher in every case (kdistill's training.compile, "
                             "TRL's torch_compile)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 mixed precision for the student in every case (kdistill's training.bf16, TRL's bf16, "
                             "its default); fp32 otherwise")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", choices=("trimmed", "full", "both"), default="both")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (trimmed vocabulary)")
    parser.add_argument("--full-steps", type=int, default=20, help="optimizer steps (full vocabulary: ~8× slower)")
    add_data_arguments(parser)
    add_recipe_arguments(parser)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--out", default="runs/bench-llm-kd")
    parser.add_argument("--results", default="benchmarks/results/llm_kd.json")
    args = parser.parse_args()
    require_data()
    cases = chosen_cases(args.cases, CASES)
    trl_cases = sorted(set(cases) & set(TRL_CASES))
    if trl_cases and importlib.util.find_spec("trl") is None:
        sys.exit(f"case {', '.join(trl_cases)} needs TRL: pip install -e '.[bench]' (or leave it out with --cases)")
    started_env = dict(os.environ)  # before kdistill is imported (it bounds oneDNN's caches)
    out = Path(args.out)
    train, held = _write_data(out, args.train, args.held_out, args.max_length)
    from kdistill.onednn import CACHE_VARIABLES

    # TRL's process runs with oneDNN's cache sizes as the benchmark was started (the libraries'
    # default, 1,024, unless set), not the bound importing kdistill sets
    args.trl_onednn_env = {name: started_env.get(name, "1024") for name in CACHE_VARIABLES}
    ctx = mp.get_context("spawn")
    results = {}
    for vocab in ("trimmed", "full") if args.vocab == "both" else (args.vocab,):
        vocab_args = argparse.Namespace(**{**vars(args), "steps": args.steps if vocab == "trimmed" else args.full_steps})
        rows = []
        for case in cases:
            queue = ctx.Queue()
            proc = ctx.Process(target=_run_case, args=(case, vocab, vocab_args, out, train, held, queue))
            proc.start()
            proc.join()
            rows.append(queue.get() if proc.exitcode == 0 else {"case": case, "error": f"exit code {proc.exitcode}"})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "quality"}), flush=True)
        results[vocab] = {"steps": vocab_args.steps, "rows": rows, "best_gemm_flops_per_s": _best_gemm_rate(rows),
                          "targets": _report(vocab, rows, vocab_args)}
    path = Path(args.results)
    path.write_text(json.dumps({"config": vars(args), "commit": _commit(), "versions": _versions(), "results": results},
                               indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
