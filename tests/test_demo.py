"""`kdistill demo --tiny`: the whole pipeline end to end, offline, in well under a minute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdistill.demo.recipes import RECORDING, _packaged


def test_written_out_recipe_is_the_packaged_one() -> None:
    assert Path("recipes/demo.yaml").read_text() == _packaged("demo.yaml").read_text()


@pytest.mark.skipif(not _packaged(RECORDING).exists(), reason="no recording of the demo's teacher calls")
def test_tiny_demo_end_to_end_and_second_run_skips(tmp_path) -> None:
    out = tmp_path / ("long-directory-name-" * 4) / "demo-tiny"  # wider than a piped console's 80 columns
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kdistill", "demo", "--tiny", "--output-dir", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in ("generate", "cache", "distill", "evaluate"):
        assert f"{stage}: done" in first.stdout
    assert "fewer parameters" in first.stdout
    assert f"report: {out / 'report' / 'report.html'} " in first.stdout  # the path whole, not wrapped
    card = json.loads((out / "data" / "data_card.json").read_text())
    assert card["status"] == "complete" and card["counts"]["examples_kept"] > 0
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["headline"]
    html = (out / "report" / "report.html").read_text()
    assert "src=\"http" not in html and "href=\"http" not in html
    assert (out / "student" / "kdistill_vocab.json").exists()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("finished earlier, skipped") == 4
