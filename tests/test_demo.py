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


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_demo_into_another_runs_directory_writes_nothing_there(tmp_path) -> None:
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "recipe.yaml").write_text("name: other\n")
    (other / "summary.json").write_text("{}")
    before = _files(other)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kdistill", "demo", "--tiny", "--output-dir", str(other)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and "holds a run of a different recipe" in error[0]
    assert _files(other) == before  # no models/ written before the refusal


def test_forced_tiny_demo_moves_the_other_run_aside_before_building_its_teacher(tmp_path) -> None:
    from kdistill.demo.recipes import demo_recipe, prepare_tiny_demo
    from kdistill.stages import claim_run_dir

    other = tmp_path / "run"
    other.mkdir()
    (other / "recipe.yaml").write_text("name: other\n")
    before = _files(other)
    recipe = demo_recipe(tiny=True, output_dir=str(other))
    assert not (other / "models").exists()  # building the recipe writes nothing
    lines: list[str] = []
    claim_run_dir(recipe, force=True, report=lines.append)
    prepare_tiny_demo(recipe)
    backups = list(tmp_path.glob("run.replaced-*"))
    assert len(backups) == 1 and _files(backups[0]) == before and "moved to" in lines[0]
    assert (other / "models" / "teacher" / "config.json").is_file()
    assert (other / "models" / RECORDING).read_bytes() == _packaged(RECORDING).read_bytes()
    assert recipe.teachers[0].model == str(other / "models" / "teacher")
