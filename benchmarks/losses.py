"""Benchmark: dense vs chunked response loss, dense vs sparse (top-k) targets, forward + backward.

Default size is Gemma 3's: V = 262,144, 4,096 tokens, hidden 640 (student and teacher).
Each case runs in its own process so that its peak memory is its own:
CUDA: ``max_memory_allocated`` above the inputs; CPU: peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``) above the RSS with the inputs in place.

    python benchmarks/losses.py                       # full size (needs ~40 GB for the dense case on CPU)
    python benchmarks/losses.py --tokens 1024         # fits a 24 GB CPU machine
    python benchmarks/losses.py --device cuda

Prints a table and writes JSON (``--out``, default ``benchmarks/results/losses-<device>-<tokens>.json``).
Target: chunked peak memory ≤ 1/8 of dense, chunked time ≤ 1.3 × dense.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import time
from pathlib import Path

import torch

from kdistill.losses import HiddenTargets, LMHead, SparseTargets, chunked_distribution_loss, distribution_loss
from kdistill.losses.chunked import auto_chunk_size

CASES = ("dense", "chunked", "dense_sparse", "chunked_sparse")


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak(device: str) -> int:
    """Reset the peak-memory counter; return current usage (the baseline)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_bytes("VmRSS")


def _peak(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_bytes("VmHWM")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _topk_targets(t_hidden: torch.Tensor, t_head: LMHead, k: int, chunk: int) -> SparseTargets:
    """Teacher top-k log-probs, made in chunks (as a signal cache would) so setup stays small."""
    ids, values = [], []
    for a in range(0, t_hidden.shape[0], chunk):
        lp = torch.log_softmax(t_head.logits(t_hidden[a : a + chunk]).float(), -1)
        v, i = lp.topk(k, -1)
        ids.append(i)
        values.append(v)
    return SparseTargets(torch.cat(ids), torch.cat(values))


def _run_case(case: str, args: argparse.Namespace, queue) -> None:
    torch.manual_seed(0)
    device = args.device
    torch.set_num_threads(args.threads) if args.threads else None
    n, v, h = args.tokens, args.vocab, args.hidden
    hidden = (torch.randn(n, h, device=device)).requires_grad_(True)
    weight = (torch.randn(v, h, device=device) * h**-0.5).requires_grad_(True)
    head = LMHead(weight)
    t_hidden = torch.randn(n, h, device=device)
    t_head = LMHead(torch.randn(v, h, device=device) * h**-0.5 * 2)
    chunk = args.chunk_size or auto_chunk_size(v)
    sparse = _topk_targets(t_hidden, t_head, args.k, chunk) if "sparse" in case else None

    def step() -> float:
        if case == "dense":
            with torch.no_grad():
                t_logits = t_head.logits(t_hidden)
            loss = distribution_loss(head.logits(hidden), t_logits)
        elif case == "dense_sparse":
            loss = distribution_loss(head.logits(hidden), sparse)
        elif case == "chunked":
            loss = chunked_distribution_loss(hidden, head, HiddenTargets(t_hidden, t_head), chunk_size=chunk)
        else:
            loss = chunked_distribution_loss(hidden, head, sparse, chunk_size=chunk)
        loss.backward()
        value = loss.item()
        hidden.grad = None
        weight.grad = None
        return value

    step()  # warm-up
    times, peaks, value = [], [], 0.0
    for _ in range(args.repeats):
        base = _reset_peak(device)
        _sync(device)
        start = time.perf_counter()
        value = step()
        _sync(device)
        times.append(time.perf_counter() - start)
        peaks.append(_peak(device) - base)
    queue.put({"case": case, "seconds": statistics.median(times), "peak_bytes": max(peaks), "loss": value,
               "chunk_size": chunk if case.startswith("chunked") else None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: auto (≈2^25 logits a chunk)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    rows = []
    for case in args.cases.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_case, args=(case, args, queue))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            rows.append({"case": case, "error": f"exit code {proc.exitcode} (out of memory?)"})
        else:
            rows.append(queue.get())

    by_case = {r["case"]: r for r in rows if "error" not in r}
    ratios = {}
    for dense, chunked in (("dense", "chunked"), ("dense_sparse", "chunked_sparse")):
        if dense in by_case and chunked in by_case:
            ratios[chunked] = {
                "memory_vs_" + dense: by_case[chunked]["peak_bytes"] / by_case[dense]["peak_bytes"],
                "time_vs_" + dense: by_case[chunked]["seconds"] / by_case[dense]["seconds"],
            }
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"\nresponse loss fwd+bwd, N={args.tokens} tokens, V={args.vocab}, H={args.hidden}, k={args.k}, "
          f"device={args.device} ({device_name}, {torch.get_num_threads()} threads)")
    print(f"{'case':16} {'time s':>9} {'peak MiB':>10} {'loss':>10}  vs dense")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:16} {r['error']}")
            continue
        extra = ratios.get(r["case"])
        note = "" if not extra else "  ".join(f"{k.split('_vs_')[0]} ×{v:.3f}" for k, v in extra.items())
        print(f"{r['case']:16} {r['seconds']:9.3f} {r['peak_bytes'] / 2**20:10.0f} {r['loss']:10.5f}  {note}")
    out = Path(args.out or f"benchmarks/results/losses-{args.device}-{args.tokens}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "device": device_name, "rows": rows, "ratios": ratios,
                               "torch": torch.__version__}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
