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
