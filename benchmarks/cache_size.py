"""Benchmark: teacher-signal cache — write time vs the teacher forward, bytes per token, decode error.

Teacher: a random-weight Llama-like model with Gemma 3's vocabulary (V = 262,144, hidden 256,
2 layers: small enough for a CPU) over ``--tokens`` tokens. Measures

- the teacher forward alone (``model(**batch).logits``, batches of ``--batch-size``) vs
  ``write_cache`` in total (hashing the weights, the forward, the head on valid rows, top-k,
  encoding, writing and sha256 of the shards), and the read-back (``TeacherCache.targets``) speed;
- bytes per token on disk (shards only; the manifest is a few kB);
- the encoding's error: max |log p̂ − log p| (top-1, entries with p ≥ 0.01, all k) and
  KL(p‖p̂) over top-k + tail bucket, on the model's own targets and on synthetic teacher
  distributions with a heavy head (fp64 reference).

    python benchmarks/cache_size.py                  # 4,096 tokens, k = 64, CPU
    python benchmarks/cache_size.py --tokens 1024 --error-tokens 256
    python benchmarks/cache_size.py --model gemma-3-270m --tokens 2048 --error-tokens 0 --out benchmarks/results/cache_size-gemma.json
    python benchmarks/cache_size.py --device cuda --dtype bfloat16 --hidden 640 --layers 18 --tokens 65536

Prints a table and writes JSON (``--out``, default ``benchmarks/results/cache_size.json``).

Measured (V = 262,144, k = 64, batches of 8; "write" includes hashing the weights once, ≈ 0.4 s
for the toy CPU model, 0.6–0.95 s for Gemma 3 270M, 0.4–1.2 s on the GPU; the ratio in brackets
leaves it out). CPU rows: medians of 3 (toy) or 5 (Gemma, ``--model gemma-3-270m --tokens 2048
--error-tokens 0 --repeats 5``) alternating rounds, fp32, 2 cores.

| teacher | device | tokens | writer | forward | write_cache | write / forward |
|---|---|---|---|---|---|---|
| hidden 256, 2 layers | 2 CPU cores | 4,096 | in-place softmax | 3.93 s | 5.72 s | 1.46 (1.35) |
| hidden 256, 2 layers | 2 CPU cores | 4,096 | streamed | 3.56 s, 4.97 s | 4.82 s, 5.98 s | 1.36, 1.20 (1.24, 1.11); two runs |
| the packaged Gemma 3 270M | 2 CPU cores | 2,048 | in-place softmax | 6.32 s | 7.59 s | 1.20 (1.05) |
| the packaged Gemma 3 270M | 2 CPU cores | 2,048 | streamed | 5.79 s | 6.56 s | 1.13 (0.99) |
| hidden 640, 18 layers, bf16 (Gemma 3 270M-sized) | H200 | 262,144 | softmax | 1.45 s | 2.29 s + hash | (1.58) |
| hidden 256, 2 layers, bf16 | H200 | 262,144 | softmax | 0.24 s | 1.85 s + hash | (7.6) |

The CPU rows were measured in one session, "in-place softmax" before and "streamed" after the
writer took top-k and tail mass block by block (``_ShardWriter._top_streamed``). In earlier
sessions the plain forward was slower on these machines and the in-place softmax measured 0.93
and 0.98 (0.87, 0.92) for Gemma (forward 9.43 s and 8.82 s) and 0.92 (0.87) for the toy (forward
6.08 s). The toy's forward is almost all head GEMM, so the exp over every logit that the tail
mass needs weighs more there than for Gemma. The GPU rows are from an earlier version (its GPU
path is unchanged since: one GEMM, softmax into a second buffer).

On the GPU the extra time is the fp32 softmax and top-k over V per token, the encoding and the
transfer of 200 B per token, which the two-layer toy's forward cannot hide; bigger teachers hide
more of it. Records take 200 B per token, 201–202 B on disk with the per-example index. Reading
(``TeacherCache.targets``) decoded ≈ 250,000 tokens/s on the GPU machine's CPU and 145,000–216,000
on 2 cores here (``read_tokens_per_s`` in the two result files); once, on a heavily loaded 2-core
machine where each small parallel op waited for a scheduler tick, it fell to ≈ 2,500.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdistill.signals.cache import hash_model, open_cache, write_cache
from kdistill.signals.encoding import ENCODING, bytes_per_token, decode_topk, encode_topk


def _errors(vals: torch.Tensor, log_tail: torch.Tensor, got: torch.Tensor) -> dict:
    """Error of decoded log-probs ``got`` against the fp64 truth ``vals`` (N, k) and ``log_tail`` (N,)."""
    vals, got, log_tail = vals.double(), got.double(), log_tail.double()
    err = (got - vals).abs()
    p = vals.exp()
    got_tail = torch.log(-torch.expm1(got.logsumexp(-1).clamp(max=0)))
    kl = (p * (vals - got)).sum(-1) + log_tail.exp() * (log_tail - got_tail)
    return {
        "max_abs_err_top1": err[:, 0].max().item(),
        "max_abs_err_p_ge_0.01": err[p >= 0.01].max().item() if (p >= 0.01).any() else 0.0,
        "max_abs_err_all_k": err.max().item(),
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "topk_mass_mean": p.sum(-1).mean().item(),
        "tokens": vals.shape[0],
    }


def _synthetic(kind: str, n: int, vocab: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Top-k (ids, log p, log tail) of softmax(logits) for ``n`` tokens, fp64.

    flat: σ·N(0, 1) logits, σ ~ U(1, 4); peaked: + U(2, 16) on one token; very_peaked: + U(20, 30)
    (p_1 > 0.99); zipf: + a 10-token head of decreasing boosts ~6–10 nats.
    """
    ids_out, vals_out, tails = [], [], []
    for start in range(0, n, 64):
        m = min(64, n - start)
        sigma = 1 + 3 * torch.rand(m, 1, generator=g, dtype=torch.float64)
        z = sigma * torch.randn(m, vocab, generator=g, dtype=torch.float64)
        if kind == "peaked":
            z[:, 0] += 2 + 14 * torch.rand(m, generator=g, dtype=torch.float64)
        elif kind == "very_peaked":
            z[:, 0] += 20 + 10 * torch.rand(m, generator=g, dtype=torch.float64)
        elif kind == "zipf":
            head = torch.randint(0, vocab, (m, 10), generator=g)
            boost = (6 + 4 * torch.rand(m, 10, generator=g, dtype=torch.float64)) * torch.linspace(1, 0.2, 10, dtype=torch.float64)
            z.scatter_add_(1, head, boost)
        logp = z.log_softmax(-1)
        vals, ids = logp.topk(k, -1)
        tails.append(logp.scatter_(-1, ids, -math.inf).logsumexp(-1))
        ids_out.append(ids)
        vals_out.append(vals)
    return torch.cat(ids_out), torch.cat(vals_out), torch.cat(tails)


def _random_llama(args, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=max(512, args.seq_len), initializer_range=0.1,
                         tie_word_embeddings=False)
    with device:  # initialise on the device (fast on a GPU)
        return LlamaForCausalLM(config).eval().to(getattr(torch, args.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--error-tokens", type=int, default=1024, help="synthetic tokens per distribution kind (0: skip)")
    parser.add_argument("--model", help="a real teacher instead of the random Llama (e.g. gemma-3-270m; "
                                         "--vocab/--hidden/--layers then come from it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3, help="alternating forward / write rounds (medians)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cache_size.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.model:
        from kdistill.models.resolve import load_model

        model = load_model(args.model, "causal").eval().to(device, getattr(torch, args.dtype))
        text = model.config.get_text_config()
        args.vocab, args.hidden = model.get_output_embeddings().out_features, text.hidden_size
        args.layers = text.num_hidden_layers
    else:
        model = _random_llama(args, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_examples = max(1, args.tokens // args.seq_len)
    examples = [{"example_id": i, "input_ids": torch.randint(0, args.vocab, (args.seq_len,)).tolist()}
                for i in range(n_examples)]
    tokens = n_examples * args.seq_len
    batches = [torch.tensor([ex["input_ids"] for ex in examples[i : i + args.batch_size]], device=device)
               for i in range(0, n_examples, args.batch_size)]

    def forward_pass() -> float:
        with torch.no_grad():
            sync()
            start = time.perf_counter()
            for batch in batches:
                _ = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits
            sync()
            return time.perf_counter() - start

    def write_pass(cache_dir: Path):
        sync()
        start = time.perf_counter()
        manifest = write_cache(cache_dir, model, None, examples, k=args.k, batch_size=args.batch_size,
                               shard_size=max(1, n_examples // 4))
        sync()
        return time.perf_counter() - start, manifest

    with torch.no_grad():  # warm-up (allocator, kernels)
        model(input_ids=batches[0])
    start = time.perf_counter()
    hash_model(model)
    hash_s = time.perf_counter() - start

    # Rounds alternate the two (a shared machine drifts by ±20% within minutes); medians compared.
    forward_runs, write_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            forward_runs.append(forward_pass())
            write_s, manifest = write_pass(Path(tmp) / f"cache-{r}")
            write_runs.append(write_s)
        forward_s, write_s = statistics.median(forward_runs), statistics.median(write_runs)
        cache_dir = Path(tmp) / f"cache-{args.repeats - 1}"
        disk = sum(f.stat().st_size for f in cache_dir.glob("shard-*.safetensors"))
        cache = open_cache(cache_dir)
        ids = torch.tensor([ex["example_id"] for ex in examples])
        cache.targets(ids[:1], args.seq_len)  # warm-up: first-call kernel set-up
        start = time.perf_counter()
        for i in range(0, n_examples, args.batch_size):
            targets = cache.targets(ids[i : i + args.batch_size], args.seq_len)
        read_s = time.perf_counter() - start
        # The model's own targets against its fp64 log-softmax (first two examples).
        first = cache.targets(ids[:2], args.seq_len)
        with torch.no_grad():
            logp = model(input_ids=batches[0][:2]).logits.double().log_softmax(-1).flatten(0, 1)
        vals, true_ids = logp.topk(args.k, -1)
        tail = logp.scatter_(-1, true_ids, -math.inf).logsumexp(-1)
        vals, true_ids, tail = vals.cpu(), true_ids.cpu(), tail.cpu()
        got_ids, got = first.ids.flatten(0, 1), first.logprobs.flatten(0, 1)
        model_err = _errors(vals, tail, got)
        model_err["ids_equal_fraction"] = (got_ids == true_ids).float().mean().item()
        del logp, targets

    g = torch.Generator().manual_seed(0)
    synthetic = {}
    for kind in ("flat", "peaked", "very_peaked", "zipf") if args.error_tokens else ():
        s_ids, s_vals, s_tail = _synthetic(kind, args.error_tokens, args.vocab, args.k, g)
        d_ids, d_vals = decode_topk(encode_topk(s_ids, s_vals.float(), args.vocab, log_tail=s_tail), args.k, args.vocab)
        assert torch.equal(d_ids, s_ids)
        synthetic[kind] = _errors(s_vals, s_tail, d_vals)

    result = {
        "machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": args.dtype,
        "model": {"name": args.model or "random llama", "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "tokens": tokens, "batch_size": args.batch_size, "seq_len": args.seq_len, "k": args.k,
        "encoding": ENCODING, "bytes_per_token_record": bytes_per_token(args.k, args.vocab),
        "bytes_per_token_on_disk": disk / tokens, "disk_bytes": disk, "shards": len(manifest.shards),
        "repeats": args.repeats, "teacher_forward_runs_s": forward_runs, "write_cache_runs_s": write_runs,
        "teacher_forward_s": forward_s, "write_cache_s": write_s, "hash_model_s": hash_s,
        "write_over_forward": write_s / forward_s,
        "write_without_hash_over_forward": (write_s - hash_s) / forward_s, "read_targets_s": read_s,
        "read_tokens_per_s": tokens / read_s,
        "error_model_targets": model_err, "error_synthetic": synthetic,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"teacher: {args.model or 'random llama'} V={args.vocab:,} hidden={args.hidden} layers={args.layers} {args.dtype} on {result['device']}, "
          f"{tokens:,} tokens, batch {args.batch_size}×{args.seq_len}, k={args.k}, {result['threads']} CPU threads")
    print(f"medians of {args.repeats} alternating rounds: forward {' '.join(f'{x:.2f}' for x in forward_runs)} s, "
          f"write {' '.join(f'{x:.2f}' for x in write_runs)} s")
    print(f"{'teacher forward (logits)':<28}{forward_s:>9.2f} s  {tokens / forward_s:>9.0f} tok/s")
    print(f"{'write_cache (total)':<28}{write_s:>9.2f} s  {tokens / write_s:>9.0f} tok/s  "
          f"({write_s / forward_s:.2f}× forward; {(write_s - hash_s) / forward_s:.2f}× without hashing the "
          f"weights, {hash_s:.2f} s)")
    print(f"{'read targets (decode)':<28}{read_s:>9.2f} s  {tokens / read_s:>9.0f} tok/s")
    print(f"bytes/token: record {result['bytes_per_token_record']}, on disk {result['bytes_per_token_on_disk']:.1f}")
    print(f"\n{'distribution':<14}{'top-1 err':>11}{'p≥.01 err':>11}{'all-k err':>11}{'KL mean':>11}{'KL max':>11}{'top-k mass':>12}")
    for name, e in [("model", model_err), *synthetic.items()]:
        print(f"{name:<14}{e['max_abs_err_top1']:>11.2e}{e['max_abs_err_p_ge_0.01']:>11.2e}"
              f"{e['max_abs_err_all_k']:>11.2e}{e['kl_mean']:>11.2e}{e['kl_max']:>11.2e}{e['topk_mass_mean']:>12.3f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
