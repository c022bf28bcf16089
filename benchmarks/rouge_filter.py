"""Benchmark: ROUGE-L novelty filter, fast (kdistill) vs reference (rouge_score on every pair).

10,000 candidate instructions (the 175 Self-Instruct seeds from ``../shared/data`` or, when absent,
kdistill's packaged seeds, plus synthetic variants: near copies with a word dropped, swapped or
replaced, and recombinations of two seeds' halves) are kept or dropped in order against the
growing pool of kept ones (threshold 0.7, drop at ≥). The reference is the original pipeline's
loop without multiprocessing: ``RougeScorer(["rougeL"], use_stemmer=False).score`` for every
(candidate, kept) pair, then the max.

    python benchmarks/rouge_filter.py                      # reference on a prefix, extrapolated (says so)
    python benchmarks/rouge_filter.py --reference full     # the whole reference loop (~1 h on a slow core)

Times are CPU seconds of this process (``time.process_time``; wall seconds beside them), so a
busy machine slows both sides alike. With ``--reference prefix`` the reference runs on the first
``--prefix`` candidates (decisions compared exactly), its time per pair is extrapolated to all
the pairs the full loop would score (known from the decisions), and ``--spot-checks`` random
later candidates are checked against the fast run's kept pool at that point: if every decision
before a candidate agrees, the pools agree, so each spot check is an exact reference decision.
Prints a table and writes JSON (``--out``, default ``benchmarks/results/rouge_filter.json``).
Target: ≥ 50× faster with identical decisions.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from importlib.metadata import version
from pathlib import Path

from kdistill.blackbox.filters import RougeNoveltyFilter, reference_rouge_novelty
from kdistill.blackbox.self_instruct import default_seed_path

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_SEEDS = ROOT.parent / "shared" / "data" / "self-instruct" / "seed_tasks.jsonl"


def seed_instructions() -> tuple[list[str], str]:
    path = ORIGINAL_SEEDS if ORIGINAL_SEEDS.exists() else default_seed_path()
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["instruction"] for line in lines if line.strip()], str(path)


def build_candidates(seeds: list[str], n: int, seed: int = 0) -> list[str]:
    """The seeds plus ``n - len(seeds)`` synthetic variants, shuffled."""
    rng = random.Random(seed)
    words = sorted({w for s in seeds for w in s.split()})
    out = list(seeds)
    while len(out) < n:
        a, b = rng.choice(seeds).split(), rng.choice(seeds).split()
        kind = rng.random()
        if kind < 0.15 and len(a) > 3:  # near copy: one word dropped
            a.pop(rng.randrange(len(a)))
        elif kind < 0.25 and len(a) > 3:  # near copy: two neighbours swapped
            i = rng.randrange(len(a) - 1)
            a[i], a[i + 1] = a[i + 1], a[i]
        elif kind < 0.4:  # one or two words replaced
            for _ in range(rng.randint(1, 2)):
                a[rng.randrange(len(a))] = rng.choice(words)
        elif kind < 0.8:  # recombination: head of one seed, tail of another
            a = a[: rng.randint(1, max(1, len(a) - 1))] + b[rng.randint(0, max(0, len(b) - 2)) :]
        else:  # three-way recombination with a few random words
            c = rng.choice(seeds).split()
            a = a[: len(a) // 3] + b[len(b) // 3 : 2 * len(b) // 3] + c[2 * len(c) // 3 :]
            a.insert(rng.randrange(len(a) + 1), rng.choice(words))
        out.append(" ".join(a))
    rng.shuffle(out)
    return out[:n]


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - c0, time.perf_counter() - w0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--reference", choices=("prefix", "full"), default="prefix")
    ap.add_argument("--prefix", type=int, default=1500)
    ap.add_argument("--spot-checks", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3, help="fast runs; the median is reported")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rouge_filter.json")
    args = ap.parse_args()

    seeds, seed_source = seed_instructions()
    texts = build_candidates(seeds, args.n)

    runs = []
    for _ in range(args.repeats):
        flt = RougeNoveltyFilter(args.threshold)
        decisions, cpu, wall = timed(lambda flt=flt: flt.filter(texts))
        runs.append((cpu, wall, decisions, flt.pairs_scored))
    fast_cpu = statistics.median(r[0] for r in runs)
    fast_wall = statistics.median(r[1] for r in runs)
    decisions, fast_pairs = runs[0][2], runs[0][3]
    assert all(r[2] == decisions for r in runs)
    kept_before, k = [], 0
    for d in decisions:
        kept_before.append(k)
        k += d
    total_pairs = sum(kept_before)  # what the reference loop scores

    if args.reference == "full":
        ref, ref_cpu, ref_wall = timed(lambda: reference_rouge_novelty(texts, (), args.threshold))
        identical = ref == decisions
        ref_note = "measured on all candidates"
        checked = {"full": args.n}
        mismatches = [i for i, (a, b) in enumerate(zip(ref, decisions)) if a != b][:10]
    else:
        m = min(args.prefix, args.n)
        ref, cpu_m, wall_m = timed(lambda: reference_rouge_novelty(texts[:m], (), args.threshold))
        pairs_m = sum(kept_before[:m])
        ref_cpu, ref_wall = cpu_m / pairs_m * total_pairs, wall_m / pairs_m * total_pairs
        ref_note = (f"EXTRAPOLATED: measured on the first {m} candidates ({pairs_m:,} pairs, "
                    f"{cpu_m:.1f} CPU s, {cpu_m / pairs_m * 1e6:.1f} µs/pair), scaled to all {total_pairs:,} pairs")
        mismatches = [i for i in range(m) if ref[i] != decisions[i]][:10]
        # spot checks after the prefix: the reference decision for candidate i against the kept pool
        rng = random.Random(1)
        later = sorted(rng.sample(range(m, args.n), min(args.spot_checks, args.n - m)))
        kept_texts = [t for t, d in zip(texts, decisions) if d]
        for i in later:
            pool = kept_texts[: kept_before[i]]
            if reference_rouge_novelty([texts[i]], pool, args.threshold) != [decisions[i]]:
                mismatches.append(i)
        identical = not mismatches
        checked = {"prefix_sequential": m, "spot_checks_after_prefix": len(later)}

    result = {
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "candidates": args.n,
        "seed_source": seed_source,
        "threshold": args.threshold,
        "kept": sum(decisions),
        "dropped": args.n - sum(decisions),
        "reference_pairs": total_pairs,
        "fast_pairs_scored_after_length_pruning": fast_pairs,
        "fast_cpu_s": round(fast_cpu, 3),
        "fast_wall_s": round(fast_wall, 3),
        "reference_cpu_s": round(ref_cpu, 1),
        "reference_wall_s": round(ref_wall, 1),
        "reference_time": ref_note,
        "speedup_cpu": round(ref_cpu / fast_cpu, 1),
        "speedup_wall": round(ref_wall / fast_wall, 1),
        "decisions_identical": identical,
        "decisions_checked": checked,
        "mismatches": mismatches,
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "rapidfuzz": version("rapidfuzz"), "rouge_score": version("rouge-score")},
    }
    rows = [
        ("candidates (seeds + variants)", f"{args.n:,} ({seed_source.split('/')[-2]})"),
        ("kept / dropped", f"{result['kept']:,} / {result['dropped']:,}"),
        ("pairs (reference loop)", f"{total_pairs:,}"),
        ("pairs scored by fast (after length pruning)", f"{fast_pairs:,}"),
        (f"fast: CPU s / wall s (median of {args.repeats})", f"{fast_cpu:.2f} / {fast_wall:.2f}"),
        ("reference: CPU s / wall s", f"{ref_cpu:.1f} / {ref_wall:.1f}"),
        ("reference time", ref_note),
        ("speed-up (CPU / wall)", f"{result['speedup_cpu']}× / {result['speedup_wall']}×"),
        ("decisions identical", f"{identical} (checked: {checked})"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
