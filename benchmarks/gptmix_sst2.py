"""Benchmark: GPT3Mix augmentation on sentence-level SST-2 (the GPT3Mix paper's setting).

Sub-samples of 3, 10 and 35 real examples per class (0.1%, 0.3%, 1% of the 6,920 sentences)
are drawn from ``../shared/data/sst2/sentences-train.txt``; a held-out split carved from the same
file (seeded, disjoint) scores every student. The teacher, the packaged Gemma 3 270M base (local
backend), writes ``ratio × real`` synthetic examples per sub-sample with soft labels from the
label-token probabilities; the student, the ``minilm-l6`` encoder with a classifier head, is
trained on real only vs real + synthetic (soft-target CE for synthetic rows). Several seeds.

    python benchmarks/gptmix_sst2.py                         # 3 seeds, sizes 3/10/35, ratio 1
    python benchmarks/gptmix_sst2.py --seeds 0 --sizes 3 --held-out 200   # a quick look

Teacher calls are recorded (SQLite under --out), so a rerun reuses them. Prints a table (mean ±
std accuracy, generation throughput, share of outputs dropped) and writes
``benchmarks/results/gptmix_sst2.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from kdistill.blackbox.augment_run import run_augment
from kdistill.distill.pipeline import run_distill
from kdistill.recipe import parse_recipe

DATA = Path("../shared/data/sst2/sentences-train.txt")
LABELS = ["0", "1"]


def _read_sentences() -> list[dict]:
    rows = []
    for i, line in enumerate(DATA.read_text().splitlines()):
        label, _, text = line.partition(" ")
        if label not in LABELS or not text.strip():
            raise SystemExit(f"{DATA} line {i + 1}: expected '<0|1> <sentence>'")
        rows.append({"text": text.strip(), "label": label})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _recipe(out: Path, name: str, train: Path, held_out: Path, n_train: int, ratio: float, seed: int,
            args: argparse.Namespace) -> str:
    batch = max(2, min(8, n_train))
    return f"""
name: {name}
task: classification
output_dir: {out / name}
student: {{model: minilm-l6}}
data:
  train: {{source: {train}}}
  validation: {{source: {held_out}}}
  labels: ['0', '1']
  max_length: 64
objective: [{{kind: ce}}]
training:
  per_device_train_batch_size: {batch}
  learning_rate: {args.learning_rate}
  max_steps: {args.steps}
  warmup_ratio: 0.1
  eval_steps: {args.steps}
  seed: {seed}
augment:
  teacher: {{backend: local, model: {args.teacher}, batch_size: 8, dtype: bfloat16}}
  text_type: movie review
  label_type: sentiment
  verbalizers: [negative, positive]
  k: {args.k}
  num_examples: {max(1, round(ratio * n_train))}
  seed: {seed}
  temperature: 0.9
  max_new_tokens: 48
  ratio: {ratio}
"""


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,10,35", help="real examples per class")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ratio", type=float, default=1.0, help="synthetic : real")
    parser.add_argument("--held-out", type=int, default=872, help="held-out sentences (GLUE dev size)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--k", type=int, default=4, help="real examples per prompt")
    parser.add_argument("--teacher", default="gemma-3-270m")
    parser.add_argument("--out", default="runs/bench-gptmix")
    parser.add_argument("--results", default="benchmarks/results/gptmix_sst2.json", help="where the JSON goes")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"skipped: {DATA} not found (the benchmark reads SST-2 from ../shared/data)")
    out = Path(args.out)
    rows = _read_sentences()
    order = list(range(len(rows)))
    random.Random(1234).shuffle(order)
    held_out = [rows[i] for i in order[: args.held_out]]
    pool = [rows[i] for i in order[args.held_out:]]
    held_path = out / "held_out.jsonl"
    _write_jsonl(held_path, held_out)

    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for size in [int(s) for s in args.sizes.split(",")]:
            rng = random.Random(f"{seed}-{size}")
            real = [r for label in LABELS for r in rng.sample([p for p in pool if p["label"] == label], size)]
            rng.shuffle(real)
            train_path = out / f"seed{seed}-size{size}" / "real.jsonl"
            _write_jsonl(train_path, real)
            k = min(args.k, len(real))
            args_k = argparse.Namespace(**{**vars(args), "k": k})
            mix = parse_recipe(_recipe(out, f"seed{seed}-size{size}-mix", train_path, held_path, len(real),
                                       args.ratio, seed, args_k))
            start = time.perf_counter()
            counts = run_augment(mix)
            gen_seconds = time.perf_counter() - start
            mixed = run_distill(mix, force=True, progress=False)
            real_only = parse_recipe(_recipe(out, f"seed{seed}-size{size}-real", train_path, held_path, len(real),
                                             0.0, seed, args_k))
            plain = run_distill(real_only, force=True, progress=False)
            prompts = counts.get("prompts") or 0
            results.append({
                "seed": seed, "per_class": size, "real": len(real), "synthetic": counts["synthetic_rows"],
                "accuracy_real_only": plain["final_eval"]["accuracy"], "accuracy_mix": mixed["final_eval"]["accuracy"],
                "generation_seconds": gen_seconds, "prompts": prompts,
                "dropped_unparsable": counts.get("dropped_unparsable", 0),
                "soft_label_source": counts.get("soft_label_source", {}),
            })
            print(json.dumps(results[-1]), flush=True)

    table = []
    print(f"\nGPT3Mix on SST-2 sentences: teacher {args.teacher}, student minilm-l6, ratio {args.ratio}, "
          f"{len(held_out)} held-out sentences, seeds {args.seeds}")
    print(f"{'per class':>9} {'real only':>15} {'real + synth':>15} {'gain':>7} {'ex/s':>6} {'dropped':>8}")
    for size in [int(s) for s in args.sizes.split(",")]:
        rs = [r for r in results if r["per_class"] == size]
        a = [r["accuracy_real_only"] for r in rs]
        b = [r["accuracy_mix"] for r in rs]
        made = sum(r["synthetic"] for r in rs)
        seconds = sum(r["generation_seconds"] for r in rs)
        prompts = sum(r["prompts"] for r in rs)
        dropped = sum(r["dropped_unparsable"] for r in rs)
        row = {"per_class": size, "real_only_mean": statistics.mean(a), "real_only_std": _sd(a),
               "mix_mean": statistics.mean(b), "mix_std": _sd(b), "examples_per_s": made / max(seconds, 1e-9),
               "dropped_share": dropped / max(prompts, 1)}
        table.append(row)
        print(f"{size:9d} {row['real_only_mean']:8.3f} ± {row['real_only_std']:.3f} {row['mix_mean']:8.3f} ± "
              f"{row['mix_std']:.3f} {row['mix_mean'] - row['real_only_mean']:+7.3f} {row['examples_per_s']:6.2f} "
              f"{row['dropped_share']:8.1%}")
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": vars(args), "runs": results, "table": table}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
