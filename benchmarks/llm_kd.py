"""Benchmark: causal-LM KD four ways, same teacher, student, data, batch and steps.

Teacher: the packaged Gemma 3 270M (fp32); student: 6 of its 18 layers (uniform), full vocabulary;
data: SST-2 sentences as plain text (``../shared/data/sst2/sentences-train.txt``), held-out split
carved from the same file; forward KL at T = 1.

    (a) kdistill, live teacher          (chunked loss, no B×L×V logits)
    (b) kdistill, from a top-64 cache   (teacher run once by ``kdistill cache``, time reported apart)
    (c) plain SFT of the student        (cross-entropy, no teacher)
    (d) TRL's GKDTrainer, off-policy (lmbda = 0, beta = 0: forward KL), TRL's defaults otherwise
        except gradient checkpointing off and fp32 on CPU, as for (a)–(c)

Each runs in its own process (so peak RSS is its own): seconds per step and tokens/s over the
training steps (after one warm-up step), peak RSS, then held-out teacher–student KL, top-1
agreement and perplexity after the same number of steps.

    python benchmarks/llm_kd.py                       # ~15 min on 2 CPU cores
    python benchmarks/llm_kd.py --steps 5 --train 64  # a quick look

Targets (issue 4): (b) ≤ 1.15× the step time of (c); (a) and (b) ≥ 1.5× the tokens/s of (d) at
≤ 0.5× its peak memory; the KD students beat the SFT student on held-out perplexity.
Prints a table and writes ``benchmarks/results/llm_kd.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path

DATA = Path("../shared/data/sst2/sentences-train.txt")
CASES = ("kdistill_live", "kdistill_cache", "sft", "trl_gkd")


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _write_data(out: Path, n_train: int, n_held: int) -> tuple[Path, Path]:
    lines = [line.partition(" ")[2].strip() for line in DATA.read_text().splitlines()]
    random.Random(7).shuffle(lines)
    out.mkdir(parents=True, exist_ok=True)
    train, held = out / "train.jsonl", out / "held_out.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:n_train]))
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[n_train:n_train + n_held]))
    return train, held


def _recipe_text(case: str, out: Path, train: Path, held: Path, args) -> str:
    objective = "[{kind: ce}]" if case == "sft" else "[{kind: forward_kl}]"
    signal = "signal: {source: cache, k: 64, batch_size: 8}\n" if case == "kdistill_cache" else ""
    return f"""
name: llm-kd-{case}
task: causal
output_dir: {out / case}
teacher: gemma-3-270m
student:
  init_from_teacher: {{strategy: uniform, num_layers: 6}}
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
  logging_steps: 1
  seed: 0
"""


def _run_case(case: str, args, out: Path, train: Path, held: Path, queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from kdistill.distill.pipeline import build_job, run_cache
    from kdistill.distill.trainer import TrainJob
    from kdistill.distill.trainer import train as train_loop
    from kdistill.eval.quality import lm_quality
    from kdistill.models.resolve import load_model
    from kdistill.recipe import parse_recipe

    recipe = parse_recipe(_recipe_text(case, out, train, held, args))
    cache_seconds = None
    if case == "kdistill_cache":
        start = time.perf_counter()
        run_cache(recipe)
        cache_seconds = time.perf_counter() - start
    job, tokenizer, sizes, _ = build_job(recipe)
    student = job.student
    tokens_per_step = None
    step_times: list[float] = []
    if case == "trl_gkd":
        step_times, tokens_per_step = _train_trl(job, recipe, args, out)
    else:
        # time each optimizer step through the metrics the loop writes (one record per step)
        start = time.perf_counter()
        train_loop(TrainJob(**{**job.__dict__, "eval_examples": None}), progress=False)
        total = time.perf_counter() - start
        records = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
        tokens_per_step = sum(int(sum(ex["attention_mask"])) for ex in job.train_examples) / len(job.train_examples) \
            * args.batch
        step_times = [total / max(len(records), 1)] * len(records)
    peak = _rss("VmHWM")
    teacher = load_model("gemma-3-270m", "causal")
    quality = lm_quality(teacher, student, "causal", job.eval_examples, job.collator, batch_size=8)
    per_step = sorted(step_times)[len(step_times) // 2] if step_times else float("nan")
    queue.put({"case": case, "seconds_per_step": per_step, "tokens_per_s": tokens_per_step / per_step,
               "peak_rss_bytes": peak, "cache_seconds": cache_seconds, "kl": quality["vs_teacher"]["kl"],
               "agreement": quality["vs_teacher"]["agreement"],
               "student_perplexity": quality["student"]["perplexity"],
               "teacher_perplexity": quality["teacher"]["perplexity"], "quality": quality})


def _train_trl(job, recipe, args, out: Path) -> tuple[list[float], float]:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdistill.models.resolve import load_model, load_tokenizer

    teacher = load_model("gemma-3-270m", "causal")
    tokenizer = load_tokenizer("gemma-3-270m")
    rows = [{"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"], "labels": ex["labels"],
             "example_id": ex["example_id"]} for ex in job.train_examples]
    dataset = datasets.Dataset.from_list(rows)
    config = GKDConfig(output_dir=str(out / "trl_gkd"), lmbda=0.0, beta=0.0, temperature=1.0,
                       per_device_train_batch_size=args.batch, learning_rate=args.lr, max_steps=args.steps,
                       lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                       use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0, dataloader_num_workers=0,
                       remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                       max_length=args.max_length)

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    def collate(batch):
        return {k: v for k, v in job.collator(batch).items() if k != "example_ids"}

    trainer = GKDTrainer(model=job.student, teacher_model=teacher, args=config, train_dataset=dataset,
                         processing_class=tokenizer, data_collator=collate, callbacks=[StepTimer()])
    trainer.train()
    tokens = sum(len(ex["input_ids"]) for ex in job.train_examples) / len(job.train_examples) * args.batch
    torch.manual_seed(0)
    return times[1:] or times, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=256, help="training sentences")
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default="runs/bench-llm-kd")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"skipped: {DATA} not found (the benchmark reads SST-2 from ../shared/data)")
    out = Path(args.out)
    train, held = _write_data(out, args.train, args.held_out)
    ctx = mp.get_context("spawn")
    rows = []
    for case in args.cases.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_case, args=(case, args, out, train, held, queue))
        proc.start()
        proc.join()
        rows.append(queue.get() if proc.exitcode == 0 else {"case": case, "error": f"exit code {proc.exitcode}"})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "quality"}), flush=True)

    ok = {r["case"]: r for r in rows if "error" not in r}
    print(f"\ncausal-LM KD, teacher gemma-3-270m → 6-layer student, {args.train} sentences, batch {args.batch}, "
          f"{args.steps} steps, CPU {args.threads} threads")
    print(f"{'case':16} {'s/step':>7} {'tok/s':>7} {'peak RSS GiB':>12} {'KL':>7} {'top-1':>6} {'ppl':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:16} {r['error']}")
            continue
        print(f"{r['case']:16} {r['seconds_per_step']:7.2f} {r['tokens_per_s']:7.0f} {r['peak_rss_bytes'] / 2**30:12.2f} "
              f"{r.get('kl', float('nan')):7.3f} {r.get('agreement', float('nan')):6.3f} "
              f"{r.get('student_perplexity', float('nan')):8.2f}")
    targets = {}
    if {"kdistill_cache", "sft"} <= ok.keys():
        targets["cache_step_le_1.15x_sft"] = ok["kdistill_cache"]["seconds_per_step"] <= 1.15 * ok["sft"]["seconds_per_step"]
    if "trl_gkd" in ok:
        for case in ("kdistill_live", "kdistill_cache"):
            if case in ok:
                targets[f"{case}_tokens_ge_1.5x_trl"] = ok[case]["tokens_per_s"] >= 1.5 * ok["trl_gkd"]["tokens_per_s"]
                targets[f"{case}_memory_le_0.5x_trl"] = ok[case]["peak_rss_bytes"] <= 0.5 * ok["trl_gkd"]["peak_rss_bytes"]
    if "sft" in ok:
        for case in ("kdistill_live", "kdistill_cache"):
            if case in ok:
                targets[f"{case}_ppl_below_sft"] = (ok[case].get("student_perplexity", 1e9)
                                                    < ok["sft"].get("student_perplexity", 0))
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))
    path = Path("benchmarks/results/llm_kd.json")
    path.write_text(json.dumps({"config": vars(args), "rows": rows, "targets": targets}, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
