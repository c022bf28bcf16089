"""The report files: headline wording, self-contained HTML, plots, no silent overwrite."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdistill.errors import ConfigError
from kdistill.eval.report import NO_MATPLOTLIB, headline, write_report


def _bins(pairs: list[tuple[int, float, float]]) -> list[dict]:
    rows = [{"lower": b / 15, "upper": (b + 1) / 15, "count": 0, "accuracy": None, "confidence": None}
            for b in range(15)]
    for b, acc, conf in pairs:
        rows[b].update(count=4, accuracy=acc, confidence=conf)
    return rows


def _metrics(run: str = "run-a", task: str = "classification") -> dict:
    def model(role: str, params: int, throughput: float, quality: dict) -> dict:
        return {"role": role, "ref": f"models/{role}",
                "size": {"parameters": {"total": params, "embedding": params // 4, "non_embedding": params * 3 // 4},
                         "file_bytes": params * 4, "memory_bytes": params * 4, "fp32_bytes": params * 4},
                "speed": {"kind": "encoder", "device": "cpu", "threads": 2, "batch_size": 16, "warmup": 1,
                          "repeats": 3, "latency_ms": 1000 / throughput, "examples_per_s": throughput,
                          "throughput": throughput, "throughput_unit": "examples/s", "sequence_length": 12,
                          "peak_memory_bytes": 3 * 2**20, "memory_method": "VmHWM (reset via clear_refs) - VmRSS before"},
                "quality": quality}

    if task == "classification":
        qt = {"accuracy": 0.9, "macro_f1": 0.89, "ece": 0.05, "reliability": _bins([(13, 0.9, 0.92), (10, 0.6, 0.7)])}
        qs = {"accuracy": 0.8775, "macro_f1": 0.87, "ece": 0.08, "reliability": _bins([(12, 0.85, 0.83)])}
    else:
        qt, qs = {"perplexity": 10.0, "nll": 2.3}, {"perplexity": 10.8, "nll": 2.38}
    student = model("student", 500_000, 200.0, qs)
    student["vs_teacher"] = {"kl": 0.12, "agreement": 0.93, "tokens": 40}
    return {"run": run, "task": task, "data": {"source": "dev.jsonl", "examples": 40},
            "models": {"teacher": model("teacher", 1_000_000, 100.0, qt), "student": student},
            "training": {"steps": 6, "train_seconds": 1.5, "final_eval": {"accuracy": 0.8}}}


CURVES = [{"step": 1, "forward_kl": 0.9, "ce": 0.7, "loss": 1.6, "lr": 0.1, "tokens_per_s": 10.0},
          {"step": 2, "forward_kl": 0.5, "ce": 0.6, "loss": 1.1, "lr": 0.1, "tokens_per_s": 10.0},
          {"step": 2, "eval_loss": 0.6, "accuracy": 0.7},
          {"step": 3, "forward_kl": 0.3, "ce": 0.5, "loss": 0.8, "lr": 0.1, "tokens_per_s": 10.0}]


def test_headline_wording_for_higher_and_lower_is_better_metrics() -> None:
    head = headline(_metrics())
    assert head["text"] == "50% fewer parameters, 2.00× faster, 97.5% of the teacher's accuracy"
    assert head["parameter_reduction"] == 0.5 and head["speedup"] == 2.0
    lm = headline(_metrics(task="causal"))
    assert lm["text"] == "50% fewer parameters, 2.00× faster, perplexity 1.08× the teacher's"
    slow = _metrics()
    slow["models"]["student"]["speed"]["throughput"] = 50.0
    assert "2.00× slower" in headline(slow)["text"]


def _assert_self_contained(html: str) -> None:
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:|//)', html, re.IGNORECASE)
    assert "<link" not in html and "<script" not in html and "@import" not in html and "url(" not in html


def test_report_files_plots_and_self_contained_html(tmp_path) -> None:
    paths = write_report(tmp_path, _metrics(), CURVES)
    report = tmp_path / "report"
    names = {p.name for p in report.iterdir()}
    assert {"metrics.json", "report.md", "report.html", "training_curves.png", "quality_vs_size.png",
            "quality_vs_speed.png", "reliability.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    for png in paths["plots"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["headline"]["text"] == "50% fewer parameters, 2.00× faster, 97.5% of the teacher's accuracy"
    assert saved["models"]["student"]["vs_teacher"]["agreement"] == 0.93
    html = (report / "report.html").read_text()
    _assert_self_contained(html)
    assert html.count('src="data:image/png;base64,') == 4
    assert "97.5% of the teacher" in html and "<style>" in html
    md = (report / "report.md").read_text()
    assert "**50% fewer parameters, 2.00× faster, 97.5% of the teacher's accuracy**" in md
    assert "![reliability diagrams](reliability.png)" in md and "| student |" in md


def test_non_finite_numbers_become_null_in_metrics_json(tmp_path) -> None:
    metrics = _metrics(task="causal")
    metrics["models"]["student"]["quality"]["perplexity"] = float("inf")
    write_report(tmp_path, metrics)
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["models"]["student"]["quality"]["perplexity"] is None


def test_without_matplotlib_the_report_has_no_plots_and_says_so(tmp_path, monkeypatch, caplog) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with caplog.at_level(logging.WARNING, logger="kdistill.eval.report"):
        paths = write_report(tmp_path, _metrics(), CURVES)
    assert paths["plots"] == []
    assert not list((tmp_path / "report").glob("*.png"))
    assert NO_MATPLOTLIB in caplog.text
    for name in ("report.md", "report.html"):
        assert "matplotlib is not installed" in (tmp_path / "report" / name).read_text()
    assert "<img" not in (tmp_path / "report" / "report.html").read_text()
    assert NO_MATPLOTLIB in json.loads((tmp_path / "report" / "metrics.json").read_text())["notes"]


def test_a_report_of_another_run_is_not_overwritten_silently(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("kdistill.eval.report.render_plots", lambda metrics, records: {})  # fast: no plots
    write_report(tmp_path, _metrics("run-a"))
    before = (tmp_path / "report" / "report.html").read_text()
    with pytest.raises(ConfigError, match="holds the report of another run .'run-a', not 'run-b'."):
        write_report(tmp_path, _metrics("run-b"))
    assert (tmp_path / "report" / "report.html").read_text() == before
    write_report(tmp_path, _metrics("run-a"))  # the same run: rewritten
    write_report(tmp_path, _metrics("run-b"), force=True)
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["run"] == "run-b"


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_html_renders_in_headless_chromium(tmp_path) -> None:
    paths = write_report(tmp_path, _metrics(), CURVES)
    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,1600", paths["html"].resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a blank page compresses to a few KB
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
