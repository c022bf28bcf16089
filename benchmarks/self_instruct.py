"""Benchmark: Self-Instruct from the 175 original seed tasks with the packaged Gemma 3 270M teacher.

Generates instruction data for a fixed budget (local backend, bf16), reports instructions
generated and kept per minute and the share dropped by each filter, reads the ROUGE-L filter
speed-up from ``benchmarks/results/rouge_filter.json`` (``benchmarks/rouge_filter.py``), then
instruction-tunes a student (6 of the teacher's 18 layers, vocabulary trimmed to the data) on the
kept pairs and reports its loss on held-out generated pairs, before and after, beside the
teacher's loss on the same pairs.

    python benchmarks/self_instruct.py                    # ~20 min on 2 CPU cores (generation ~15 of them)
    python benchmarks/self_instruct.py --instructions 20  # a quick look

Prints a table and writes ``benchmarks/results/self_instruct.json`` (``--results``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from kdistill.blackbox.generate_run import run_generate
from kdistill.distill.pipeline import build_job, run_distill
from kdistill.distill.trainer import evaluate
from kdistill.models.resolve import load_model
from kdistill.recipe import parse_recipe

SEEDS = Path("../shared/data/self-instruct/seed_tasks.jsonl")


def _recipe(out: Path, args: argparse.Namespace) -> str:
    return f"""
name: bench-self-instruct
task: causal
output_dir: {out}
teacher: gemma-3-270m
student:
  init_from_teacher: {{strategy: uniform, num_layers: 6, vocab: {{keep: corpus}}}}
data:
  train: {{source: {out / 'data' / 'data.jsonl'}}}
  format: instruction
  validation_fraction: 0.2
  max_length: 256
generate:
  teacher: {{backend: local, model: gemma-3-270m, batch_size: 8, dtype: bfloat16}}
  seeds: {SEEDS}
  num_instructions: {args.instructions}
  max_instances: 2
  prompts_per_call: 4
  temperature: 1.0
  top_p: 0.9
  max_new_tokens: 96
objective: [{{kind: ce}}]
training:
  per_device_train_batch_size: 4
  learning_rate: 2.0e-4
  max_steps: {args.steps}
  warmup_ratio: 0.1
  eval_steps: {args.steps}
  seed: 0
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", type=int, default=60, help="target of kept machine instructions")
    parser.add_argument("--steps", type=int, default=150, help="SFT steps")
    parser.add_argument("--out", default="runs/bench-self-instruct")
    parser.add_argument("--results", default="benchmarks/results/self_instruct.json", help="where the JSON goes")
    args = parser.parse_args()
    if not SEEDS.exists():
        sys.exit(f"skipped: {SEEDS} not found (the benchmark reads the 175 seed tasks from ../shared/data)")
    out = Path(args.out)
    recipe = parse_recipe(_recipe(out, args), "benchmarks/self_instruct.py")

    start = time.perf_counter()
    result = run_generate(recipe)
    minutes = (time.perf_counter() - start) / 60
    counts = result.counts
    parsed = counts["instructions_parsed"]
    dropped_instr = counts.get("instructions_dropped", {})
    dropped_examples = counts.get("examples_dropped", {})
    generated = counts["examples_generated"]
    shares = {f"instruction/{k}": v / max(parsed, 1) for k, v in dropped_instr.items()}
    shares |= {f"example/{k}": v / max(generated, 1) for k, v in dropped_examples.items()}

    # held-out loss of the untrained student, the trained student and the teacher on the same pairs
    job, _, _, _ = build_job(recipe)
    device = torch.device("cpu")
    before = evaluate(job.student, "causal", job.eval_examples, job.collator, 8, device, 0)
    summary = run_distill(recipe, force=True, progress=False)
    after = summary["final_eval"]
    teacher_recipe = parse_recipe(_recipe(out, args).replace(
        "  init_from_teacher: {strategy: uniform, num_layers: 6, vocab: {keep: corpus}}", "  model: gemma-3-270m"))
    teacher_job, _, _, _ = build_job(teacher_recipe)
    teacher = load_model("gemma-3-270m", "causal")
    teacher_eval = evaluate(teacher, "causal", teacher_job.eval_examples, teacher_job.collator, 8, device, 0)

    rouge = Path("benchmarks/results/rouge_filter.json")
    rouge_speedup = json.loads(rouge.read_text()).get("speedup_cpu") if rouge.exists() else None
    record = {
        "config": vars(args), "teacher": "gemma-3-270m (local, bf16)", "seeds": str(SEEDS), "generation_minutes": minutes,
        "instructions_parsed": parsed, "instructions_kept": counts["instructions_kept"],
        "instructions_kept_per_minute": counts["instructions_kept"] / minutes,
        "instructions_parsed_per_minute": parsed / minutes, "examples_generated": generated,
        "examples_kept": counts["examples_kept"], "dropped_share": shares, "prompts": counts["prompts"],
        "rouge_filter_speedup": rouge_speedup,
        "sft": {"train_examples": len(job.train_examples), "held_out_examples": len(job.eval_examples),
                "student_loss_before": before["eval_loss"], "student_loss_after": after["eval_loss"],
                "teacher_loss": teacher_eval["eval_loss"], "steps": summary["steps"],
                "student_parameters": summary["parameters"]["student"]["total"],
                "teacher_parameters": summary["parameters"]["teacher"]["total"]},
    }
    print(f"\nSelf-Instruct with {record['teacher']} from {SEEDS.name} (175 seeds)")
    print(f"  generation: {minutes:.1f} min, {parsed} instructions parsed ({parsed / minutes:.1f}/min), "
          f"{counts['instructions_kept']} kept ({record['instructions_kept_per_minute']:.1f}/min), "
          f"{generated} examples generated, {counts['examples_kept']} kept")
    for name, share in sorted(shares.items()):
        print(f"  dropped by {name:28} {share:6.1%}")
    if rouge_speedup:
        print(f"  ROUGE-L novelty filter: {rouge_speedup:.0f}× the reference loop (benchmarks/rouge_filter.py)")
    sft = record["sft"]
    print(f"  SFT student ({sft['student_parameters']:,} params) on {sft['train_examples']} pairs, "
          f"{sft['held_out_examples']} held out: loss {sft['student_loss_before']:.3f} → "
          f"{sft['student_loss_after']:.3f} (perplexity {math.exp(sft['student_loss_after']):.1f}); "
          f"teacher {sft['teacher_loss']:.3f}")
    path = Path(args.results)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
