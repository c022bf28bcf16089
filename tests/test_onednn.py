"""Importing kdistill bounds oneDNN's per-shape caches: bf16 GEMMs of new shapes stop adding memory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kdistill.onednn import CACHE_CAPACITY, CACHE_VARIABLES

GROWTH = """
import sys
from pathlib import Path
if sys.argv[1] == "kdistill":
    import kdistill  # noqa: F401
import torch

torch.set_num_threads(2)

def rss_mib():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) // 1024

w = torch.randn(2048, 640).bfloat16()
(torch.randn(8, 640).bfloat16() @ w.t()).sum()
start = rss_mib()
for n in range(900, 1050):  # 150 shapes, as batches of different token counts make
    x = torch.randn(n, 640).bfloat16()
    y = x @ w.t()
    (y.t() @ x).sum()
print(rss_mib() - start)
"""


def _run(code: str, *args: str, env: dict[str, str]) -> str:
    base = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    done = subprocess.run([sys.executable, "-c", code, *args], env={**base, **env}, capture_output=True,
                          text=True, timeout=300, check=True)
    return done.stdout.strip()


def test_import_sets_both_capacities_unless_set() -> None:
    show = "import os, kdistill; print(' '.join(os.environ[n] for n in kdistill.onednn.CACHE_VARIABLES))"
    assert _run(show, env={}) == f"{CACHE_CAPACITY} {CACHE_CAPACITY}"
    assert _run(show, env={CACHE_VARIABLES[0]: "7"}) == f"7 {CACHE_CAPACITY}"  # the user's value wins


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_bf16_gemms_of_new_shapes_stop_adding_memory() -> None:
    unbounded = int(_run(GROWTH, "plain", env={name: "1024" for name in CACHE_VARIABLES}))
    if unbounded < 200:
        pytest.skip(f"this CPU's bf16 GEMMs keep little per-shape state ({unbounded} MiB over 150 shapes)")
    bounded = int(_run(GROWTH, "kdistill", env={}))
    assert bounded < unbounded / 2, (bounded, unbounded)
