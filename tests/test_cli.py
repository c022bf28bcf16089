"""The command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kdistill.losses import all_losses


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kdistill", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def test_example_distils_and_writes_metrics(tmp_path) -> None:
    out = tmp_path / "metrics.json"
    result = _run("example", "--steps", "60", "--output", str(out))
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    assert metrics["steps"] == 60 and len(metrics["loss_curve"]) == 60
    assert metrics["kl_after"] < 0.8 * metrics["kl_before"]
    assert metrics["agreement_after"] > metrics["agreement_before"]
    assert metrics["student_params"] < metrics["teacher_params"]
    assert "top-1 agreement" in result.stdout


def test_user_mistakes_are_one_line_and_exit_2(tmp_path) -> None:
    for args in (["example", "--kind", "kl"], ["example", "--steps", "0"]):
        result = _run(*args)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kdistill: error: ")
        assert "Traceback" not in result.stderr


def test_losses_lists_every_registered_kind() -> None:
    result = _run("losses")
    assert result.returncode == 0
    for entry in all_losses():
        assert entry.kind in result.stdout
