"""Benchmark: a teacher's inference precision — forward time, memory and fidelity, fp32 vs bf16.

Teacher: the packaged Gemma 3 270M (``--model``). Data: ``--rows`` SST-2 sentences
(``../shared/data/sst2/sentences-train.txt``) packed into rows of up to ``--max-length`` tokens,
batches of ``--batch``. For each precision (``float32``: as loaded; ``bfloat16``:
:func:`kdistill.models.precision.set_inference_precision`, bf16 body, fp32 head) it measures the
body's forward (``base_model``, what a live teacher and ``kdistill cache`` run before the head;
median over ``--repeats`` alternating rounds), the bytes of the weights, and against the fp32
teacher over every token: KL(p_fp32 ‖ p_bf16), top-1 agreement and the max |Δ log p| of the fp32
top-1 token.

    python benchmarks/teacher_precision.py            # ~2 min on 2 CPU cores

Prints a table and writes ``benchmarks/results/teacher_precision.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from packing import pack_sentences

DATA = Path("../shared/data/sst2/sentences-train.txt")


def _batches(tokenizer, rows: int, max_length: int, batch: int) -> list[dict]:
    sentences = [line.partition(" ")[2].strip() for line in DATA.read_text().splitlines()][: rows * 16]
    texts = pack_sentences(tokenizer, sentences, max_length, rows)
    return [tokenizer(texts[i : i + batch], return_tensors="pt", padding=True) for i in range(0, len(texts), batch)]


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher_precision.json"))
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"skipped: {DATA} not found (the benchmark reads SST-2 from ../shared/data)")
    torch.set_num_threads(args.threads)
    from kdistill.models.precision import set_inference_precision
    from kdistill.models.resolve import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    batches = _batches(tokenizer, args.rows, args.max_length, args.batch)
    models = {"float32": load_model(args.model, "causal").eval()}
    models["bfloat16"] = set_inference_precision(copy.deepcopy(models["float32"]), "bfloat16")
    tokens = int(sum(b["attention_mask"].sum() for b in batches))

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model.base_model(**batches[0])
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                for b in batches:
                    model.base_model(**b)
                times[name].append(time.perf_counter() - start)
        kl = agree = n = 0.0
        top1_err = 0.0
        for b in batches:
            mask = b["attention_mask"].bool()
            ref = models["float32"](**b).logits[mask].log_softmax(-1)
            got = models["bfloat16"](**b).logits[mask].log_softmax(-1)
            kl += float((ref.exp() * (ref - got)).sum())
            top = ref.argmax(-1, keepdim=True)
            agree += float((got.argmax(-1, keepdim=True) == top).sum())
            top1_err = max(top1_err, float((ref.gather(-1, top) - got.gather(-1, top)).abs().max()))
            n += int(mask.sum())

    rows = {name: {"forward_seconds": statistics.median(times[name]), "rounds": times[name],
                   "tokens_per_s": tokens / statistics.median(times[name]), "weight_bytes": _weight_bytes(model)}
            for name, model in models.items()}
    fidelity = {"kl_mean": kl / n, "top1_agreement": agree / n, "top1_logp_max_abs_err": top1_err}
    print(f"{args.model}: {len(batches)} batches of ≤{args.batch} rows, {tokens} tokens, {args.threads} threads")
    print(f"{'precision':10} {'forward s':>9} {'tok/s':>7} {'weights MB':>10}")
    for name, r in rows.items():
        print(f"{name:10} {r['forward_seconds']:9.2f} {r['tokens_per_s']:7.0f} {r['weight_bytes'] / 1e6:10.0f}")
    print(f"speed-up {rows['float32']['forward_seconds'] / rows['bfloat16']['forward_seconds']:.2f}×; bf16 vs fp32: "
          f"KL {fidelity['kl_mean']:.2e}, top-1 agreement {fidelity['top1_agreement']:.4f}, "
          f"max |Δ log p(top-1)| {fidelity['top1_logp_max_abs_err']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {**vars(args), "out": str(args.out)}, "tokens": tokens,
                                    "machine": platform.processor() or platform.machine(),
                                    "results": rows, "fidelity": fidelity}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
