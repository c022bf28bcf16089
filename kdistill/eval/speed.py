"""Inference speed of a model, measured the same way for teacher and student.

Each measurement: ``warmup`` untimed passes, then ``repeats`` timed passes over the same
batches; the median is reported (robust to a noisy neighbour on a shared CPU).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Speed:
    batch_size: int
    latency_ms: float  # median time of one forward pass of one batch
    examples_per_s: float  # batch_size / latency


@torch.no_grad()
def measure_speed(model: nn.Module, tokenizer, texts: list[str], batch_size: int, *, max_length: int = 128,
                  warmup: int = 2, repeats: int = 5, device: str = "cpu") -> Speed:
    """Median forward latency over batches of ``batch_size`` texts (each timed pass runs them all)."""
    model = model.eval().to(device)
    batches = [tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                         return_tensors="pt").to(device) for i in range(0, len(texts) - batch_size + 1, batch_size)]
    if not batches:
        raise ValueError(f"need at least {batch_size} texts, got {len(texts)}")
    per_batch = []
    for rep in range(warmup + repeats):
        start = time.perf_counter()
        for batch in batches:
            model(**batch)
        if device != "cpu":
            torch.cuda.synchronize()
        if rep >= warmup:
            per_batch.append((time.perf_counter() - start) / len(batches))
    latency = statistics.median(per_batch)
    return Speed(batch_size, latency * 1000, batch_size / latency)


# ---------------------------------------------------------------------------- teacher vs student report
#
# ``measure_model_speed`` is what ``kdistill evaluate`` runs for every model of a report: the same
# inputs, the same warm-up and repetitions, medians. Encoders (classification, masked LM) are timed
# on forward passes; causal LMs on prefill (one forward over the prompt, building the KV cache) and
# decode (``new_tokens`` single-token steps reusing the cache, greedy), timed separately.


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _proc_status_kib(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in KiB from ``/proc/self/status`` (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that a pass re-using them counts."""
    import ctypes
    import ctypes.util

    try:
        name = ctypes.util.find_library("c")
        if name:
            ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory a block of code adds, in bytes (``with PeakMemory(device) as m: ...; m.bytes``).

    CUDA: ``max_memory_allocated − memory_allocated`` before the block (tensors only, after a
    peak-stats reset). CPU (Linux): resident-set growth, ``VmHWM − VmRSS`` before the block, the
    high-water mark reset by writing ``5`` to ``/proc/self/clear_refs`` and glibc's free heap
    trimmed first; it counts everything the process touches (torch's allocator, oneDNN scratch,
    Python objects), not just tensors. Where the mark cannot be reset it is only reported if the
    block raised it; otherwise ``bytes`` is None. ``method`` says which measurement was made.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = str(device)
        self.bytes: int | None = None
        self.method = "unavailable"

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import gc

        gc.collect()
        _trim_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._reset = True
        except OSError:
            self._reset = False
        self._hwm_before = _proc_status_kib("VmHWM")
        self._base = _proc_status_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
            self.method = "cuda max_memory_allocated - memory_allocated before"
            return
        hwm = _proc_status_kib("VmHWM")
        if hwm is None or self._base is None:
            return
        if self._reset:
            self.bytes, self.method = max(0, hwm - self._base) * 1024, "VmHWM (reset via clear_refs) - VmRSS before"
        elif self._hwm_before is not None and hwm > self._hwm_before:
            self.bytes, self.method = (hwm - self._base) * 1024, "VmHWM - VmRSS before (mark not resettable)"


def _cycle(items: list, n: int) -> list:
    """``n`` items taken from ``items`` in order, wrapping around."""
    return [items[i % len(items)] for i in range(n)]


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _token_rows(tokenizer, texts: list[str], rows: int, length: int, device: str) -> torch.Tensor:
    """(rows, length) prompts cut from the texts' tokens laid end to end (wrapping around): equal
    lengths, no padding, real tokens."""
    stream = [i for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"] for i in ids]
    if not stream:
        raise ValueError("the texts for the speed measurement tokenize to nothing")
    return torch.tensor(_cycle(stream, rows * length), dtype=torch.long, device=device).view(rows, length)


def _cache_of(output):
    """The KV cache of a model output (``cache``, formerly ``past_key_values``)."""
    cache = output.get("cache")
    return cache if cache is not None else output.get("past_key_values")


class _EncoderBench:
    """Timed workloads of an encoder: ``latency`` (single texts) and ``throughput`` (batches)."""

    kind = "encoder"

    def __init__(self, model: nn.Module, tokenizer, texts: list[str], pairs: list[str] | None, batch_size: int,
                 max_length: int, device: str, latency_examples: int, throughput_batches: int) -> None:
        def encode(idx: list[int]) -> dict:
            second = [pairs[i] for i in idx] if pairs is not None else None
            return tokenizer([texts[i] for i in idx], second, padding=True, truncation=True,
                             max_length=max_length, return_tensors="pt").to(device)

        order = list(range(len(texts)))
        self.model, self.device, self.batch_size = model, device, batch_size
        self.singles = [encode([i]) for i in _cycle(order, latency_examples)]
        many = _cycle(order, batch_size * throughput_batches)
        self.batches = [encode(many[b * batch_size:(b + 1) * batch_size]) for b in range(throughput_batches)]

    def _run(self, items: list[dict]) -> tuple[float]:
        _sync(self.device)
        start = time.perf_counter()
        for inputs in items:
            self.model(**inputs)
        _sync(self.device)
        return (time.perf_counter() - start,)

    def latency(self) -> tuple[float]:
        return self._run(self.singles)

    def throughput(self) -> tuple[float]:
        return self._run(self.batches)

    def memory_pass(self) -> None:
        self.model(**self.batches[0])

    def result(self, latency: list[float], throughput: list[float]) -> dict:
        (single,), (multi,) = latency, throughput
        rate = self.batch_size * len(self.batches) / multi
        return {"kind": "encoder", "latency_ms": 1000 * single / len(self.singles),
                "batch_latency_ms": 1000 * multi / len(self.batches), "examples_per_s": rate,
                "throughput": rate, "throughput_unit": "examples/s",
                "sequence_length": int(self.batches[0]["input_ids"].shape[1])}


class _CausalBench:
    """Timed workloads of a causal LM: prefill + ``new_tokens`` greedy decode steps with the KV
    cache, at batch 1 (``latency``) and at ``batch_size`` (``throughput``)."""

    kind = "causal"

    def __init__(self, model: nn.Module, tokenizer, texts: list[str], batch_size: int, max_length: int,
                 new_tokens: int, device: str) -> None:
        import inspect

        limit = _max_positions(model)
        self.length = max(1, min(max_length, limit - new_tokens - 1) if limit else max_length)
        params = inspect.signature(model.forward).parameters
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.model, self.device, self.batch_size, self.new_tokens = model, device, batch_size, new_tokens
        self.one = _token_rows(tokenizer, texts, 1, self.length, device)
        self.many = _token_rows(tokenizer, texts, batch_size, self.length, device)

    def _generate(self, ids: torch.Tensor) -> tuple[float, float]:
        """(prefill seconds, decode seconds)."""
        _sync(self.device)
        start = time.perf_counter()
        out = self.model(input_ids=ids, use_cache=True, **self.keep)
        token = out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        prefilled = time.perf_counter()
        past = _cache_of(out)
        for _ in range(self.new_tokens):
            out = self.model(input_ids=token, use_cache=True, **{self.cache_arg: past})
            past, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        return prefilled - start, time.perf_counter() - prefilled

    def latency(self) -> tuple[float, float]:
        return self._generate(self.one)

    def throughput(self) -> tuple[float, float]:
        return self._generate(self.many)

    def memory_pass(self) -> None:
        self._generate(self.many)

    def result(self, latency: list[float], throughput: list[float]) -> dict:
        (prefill_1, decode_1), (prefill_b, decode_b) = latency, throughput
        n, b = self.new_tokens, self.batch_size
        decode_rate = b * n / decode_b if n else float("nan")
        return {"kind": "causal", "latency_ms": 1000 * prefill_1,
                "decode_ms_per_token": 1000 * decode_1 / n if n else float("nan"),
                "prompt_tokens": self.length, "new_tokens": n,
                "prefill_tokens_per_s": b * self.length / prefill_b, "decode_tokens_per_s": decode_rate,
                "throughput": decode_rate, "throughput_unit": "decode tokens/s"}


@torch.no_grad()
def measure_speeds(models: dict[str, tuple[nn.Module, object]], texts: list[str], task: str, *,
                   pairs: list[str] | None = None, batch_size: int = 16, max_length: int = 128,
                   new_tokens: int = 16, warmup: int = 1, repeats: int = 5, device: str = "cpu",
                   latency_examples: int = 8, throughput_batches: int = 2) -> dict[str, dict]:
    """Latency at batch 1, throughput at ``batch_size`` and peak memory of each model (name →
    (model, tokenizer)), measured the same way and **interleaved**: every repetition times each
    model in turn, so a load that comes and goes on a shared machine hits them alike.

    Encoders (``classification``, ``mlm``): ``latency_ms`` = median over repetitions of the mean
    forward time of ``latency_examples`` single texts; ``examples_per_s`` = examples / median time
    of ``throughput_batches`` batches of ``batch_size`` texts (texts reused in order when too few).
    Causal LMs (``causal``): prompts are ``prompt_tokens`` = min(max_length, positions − new_tokens
    − 1) real tokens (the texts laid end to end), so every row has the same length and no padding;
    ``latency_ms`` = median prefill time at batch 1, ``decode_ms_per_token`` = median decode time
    per step at batch 1; ``prefill_tokens_per_s`` = B·prompt_tokens / prefill time and
    ``decode_tokens_per_s`` = B·new_tokens / decode time at B = ``batch_size`` (greedy steps reusing
    the KV cache). ``throughput`` is examples/s (encoders) or decode tokens/s (causal LMs): the speed
    a report compares. ``warmup`` untimed rounds come first. ``peak_memory_bytes``: one untimed pass
    at ``batch_size`` after the timing (see :class:`PeakMemory` for what is measured).
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch_size ≥ 1, repeats ≥ 1, warmup ≥ 0 (got {batch_size}, {repeats}, {warmup})")
    if not texts:
        raise ValueError("no texts to measure speed on")
    benches = {}
    for name, (model, tokenizer) in models.items():
        model = model.eval().to(device)
        benches[name] = (_CausalBench(model, tokenizer, texts, batch_size, max_length, new_tokens, device)
                         if task == "causal" else
                         _EncoderBench(model, tokenizer, texts, pairs, batch_size, max_length, device,
                                       latency_examples, throughput_batches))
    samples: dict[str, dict[str, list]] = {name: {"latency": [], "throughput": []} for name in benches}
    for rep in range(warmup + repeats):
        for workload in ("latency", "throughput"):
            for name, bench in benches.items():
                timing = getattr(bench, workload)()
                if rep >= warmup:
                    samples[name][workload].append(timing)
    results = {}
    for name, bench in benches.items():
        medians = {w: [statistics.median(col) for col in zip(*rows)] for w, rows in samples[name].items()}
        with PeakMemory(device) as memory:
            bench.memory_pass()
        results[name] = {"device": str(device),
                         "threads": None if str(device).startswith("cuda") else torch.get_num_threads(),
                         "batch_size": batch_size, "warmup": warmup, "repeats": repeats,
                         **bench.result(medians["latency"], medians["throughput"]),
                         "peak_memory_bytes": memory.bytes, "memory_method": memory.method}
    return results


def measure_model_speed(model: nn.Module, tokenizer, texts: list[str], task: str, **options) -> dict:
    """:func:`measure_speeds` of one model (same options)."""
    return measure_speeds({"model": (model, tokenizer)}, texts, task, **options)["model"]
