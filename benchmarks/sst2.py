"""Benchmark: task-specific KD on SST-2 with the packaged MiniLM-L6 teacher.

1. fine-tune the 6-layer teacher (recipes/sst2-minilm-teacher.yaml);
2. distil a 3-layer student initialised from teacher layers 0, 2, 5 (recipes/sst2-minilm.yaml);
3. train the same 3-layer student, same init, hard labels only (no KD);
then evaluate all three on the held-out split carved from ``../shared/data/sst2/train.tsv``:
accuracy, parameters, CPU latency (batch 1) and throughput (batch 32), medians of repeated passes.

    python benchmarks/sst2.py                        # ~1 h on 2 CPU cores (training 52 min of it)
    python benchmarks/sst2.py --train-rows 2000 --epochs 1   # a quick look

Targets: KD student ≥ 97% of the teacher's accuracy, ≥ 1.8× its throughput, above the no-KD student.
Prints a table and writes ``benchmarks/results/sst2.json`` (``--results``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdistill.data import ClassificationFormat, Collator, load_rows
from kdistill.data.sources import split_rows
from kdistill.distill.pipeline import run_distill
from kdistill.distill.trainer import evaluate
from kdistill.eval.speed import measure_speed
from kdistill.models.student import count_parameters
from kdistill.recipe import load_recipe

DATA = Path("../shared/data/sst2/train.tsv")


def _overrides(args: argparse.Namespace, out: Path, name: str) -> list[str]:
    held_out = args.validation_rows / (args.train_rows + args.validation_rows)
    return [f"output_dir={out / name}", f"data.train.limit={args.train_rows + args.validation_rows}",
            f"data.validation_fraction={held_out}", f"training.num_train_epochs={args.epochs}",
            f"training.eval_steps={args.eval_steps}", f"training.save_steps={args.eval_steps}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=12000)
    parser.add_argument("--validation-rows", type=int, default=1500)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--eval-steps", type=int, default=125)
    parser.add_argument("--out", default="runs/bench-sst2")
    parser.add_argument("--results", default="benchmarks/results/sst2.json", help="where the JSON goes")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs in --out")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"skipped: {DATA} not found (the benchmark reads SST-2 from ../shared/data)")
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    teacher_dir = out / "teacher" / "student"
    stages = [
        ("teacher", "recipes/sst2-minilm-teacher.yaml", []),
        ("kd", "recipes/sst2-minilm.yaml", [f"teacher={teacher_dir}"]),
        ("no_kd", "recipes/sst2-minilm.yaml", [f"teacher={teacher_dir}", "name=sst2-minilm-no-kd",
                                               "objective=[{kind: ce}]"]),
    ]
    train_seconds = {}
    for name, recipe_path, extra in stages:
        if args.reuse and (out / name / "summary.json").exists():
            train_seconds[name] = json.loads((out / name / "summary.json").read_text())["train_seconds"]
            continue
        recipe = load_recipe(recipe_path, _overrides(args, out, name) + extra)
        start = time.perf_counter()
        run_distill(recipe, force=True)
        train_seconds[name] = time.perf_counter() - start

    # the held-out split, exactly as the recipes carved it
    recipe = load_recipe("recipes/sst2-minilm.yaml", _overrides(args, out, "kd"))
    rows = load_rows(str(DATA))[: recipe.data.train.limit]
    _, held_out = split_rows(rows, validation_fraction=recipe.data.validation_fraction, seed=recipe.training.seed)
    texts = [r["sentence"] for r in held_out]
    results = {}
    for name in ("teacher", "kd", "no_kd"):
        model_dir = out / name / "student"
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        fmt = ClassificationFormat("sentence", None, "label", ["0", "1"], recipe.data.max_length)
        examples = fmt.encode(held_out, tokenizer, source_name="held-out")
        quality = evaluate(model, "classification", examples, Collator(tokenizer, "classification"), 128,
                           torch.device("cpu"), seed=0)
        speed1 = measure_speed(model, tokenizer, texts[:64], 1, max_length=recipe.data.max_length)
        speed32 = measure_speed(model, tokenizer, texts[:512], 32, max_length=recipe.data.max_length)
        results[name] = {"accuracy": quality["accuracy"], "eval_loss": quality["eval_loss"],
                         "parameters": count_parameters(model), "layers": model.config.num_hidden_layers,
                         "latency_ms_batch1": speed1.latency_ms, "throughput_batch32": speed32.examples_per_s,
                         "train_seconds": train_seconds[name]}

    teacher = results["teacher"]
    for r in results.values():
        r["accuracy_vs_teacher"] = r["accuracy"] / teacher["accuracy"]
        r["throughput_vs_teacher"] = r["throughput_batch32"] / teacher["throughput_batch32"]
        r["latency_speedup"] = teacher["latency_ms_batch1"] / r["latency_ms_batch1"]
        r["parameters_vs_teacher"] = r["parameters"]["total"] / teacher["parameters"]["total"]
    kd, no_kd = results["kd"], results["no_kd"]
    targets = {"kd_accuracy_ge_97pct_teacher": kd["accuracy_vs_teacher"] >= 0.97,
               "kd_throughput_ge_1.8x_teacher": kd["throughput_vs_teacher"] >= 1.8,
               "kd_above_no_kd": kd["accuracy"] > no_kd["accuracy"]}

    print(f"\nSST-2 (GLUE train.tsv): {args.train_rows} training rows, {len(held_out)} held out; "
          f"CPU, {torch.get_num_threads()} threads")
    print(f"{'model':8} {'layers':>6} {'params':>11} {'accuracy':>9} {'of teacher':>10} {'lat b1 ms':>10} "
          f"{'b32 ex/s':>9} {'× teacher':>9} {'train s':>8}")
    for name, r in results.items():
        print(f"{name:8} {r['layers']:6d} {r['parameters']['total']:11,} {r['accuracy']:9.4f} "
              f"{r['accuracy_vs_teacher']:10.1%} {r['latency_ms_batch1']:10.2f} {r['throughput_batch32']:9.1f} "
              f"{r['throughput_vs_teacher']:9.2f} {r['train_seconds']:8.0f}")
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": vars(args), "held_out": len(held_out), "results": results,
                                "targets": targets, "torch_threads": torch.get_num_threads()}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
