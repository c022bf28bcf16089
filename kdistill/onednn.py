"""Bound oneDNN's per-shape caches, so bf16 training on a CPU does not grow with every batch shape.

On a CPU, torch runs bf16 GEMMs through oneDNN (AMX / AVX512-BF16), which keeps state for every
GEMM shape it has seen in two LRU caches of 1,024 entries each: oneDNN's primitive cache
(``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and ideep's (``LRU_CACHE_CAPACITY``). Training batches
differ in token count, so nearly every step brings new shapes. Measured here (2 cores, AMX), per
new shape of a (n × 640) · (640 × 2,048) bf16 GEMM and its weight-gradient GEMM: 4.4 MiB more
resident memory, with no bound short of 1,024 shapes; capping one cache alone does not help, both
together do: at 32 entries each the growth stops at about 240 MiB, at 16 at about 135 MiB. fp32
GEMMs (MKL) keep no such state. Training the trimmed Gemma student of ``benchmarks/llm_kd.py``
(SFT, bf16 autocast, 30 steps, batches of 8 rows padded to 121–128 tokens): peak RSS 1,929 MiB
with the default caches, 1,629 MiB with 32 entries each, at the same step time (1.48 s median
against 1.5–1.7 s).

Each cache reads its variable once, at the first bf16 GEMM of the process, so
:func:`bound_onednn_caches` runs when ``kdistill`` is imported; a value the user set wins.
"""

from __future__ import annotations

import os

CACHE_CAPACITY = 32  # entries per cache: about one training step's distinct GEMM shapes
CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_onednn_caches(capacity: int = CACHE_CAPACITY) -> dict[str, str]:
    """Set each cache's capacity to ``capacity`` unless already set; return the values in force."""
    return {name: os.environ.setdefault(name, str(capacity)) for name in CACHE_VARIABLES}
