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
    cases = [(["example", "--kind", "kl"], "--kind 'kl' is not one of"), (["example", "--steps", "0"], "--steps"),
             (["example", "--temperature", "0"], "--temperature must be a positive number, got 0.0"),
             (["example", "--output", str(tmp_path)], f"--output {tmp_path} is a folder"),
             (["example", "--output", str(tmp_path / "no" / "m.json")],
              f"is in a folder that does not exist ({tmp_path / 'no'})")]
    for args, message in cases:
        result = _run(*args)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kdistill: error: ") and message in lines[0], lines
        assert "Traceback" not in result.stderr and "distilling" not in result.stdout  # refused before training
    assert list(tmp_path.iterdir()) == []


def test_losses_lists_every_registered_kind() -> None:
    result = _run("losses")
    assert result.returncode == 0
    kinds = {cells[1].strip() for cells in (line.split("│") for line in result.stdout.splitlines()) if len(cells) > 2}
    assert {entry.kind for entry in all_losses()} | {"ce"} <= kinds  # ce: the hard-label term recipes use


def test_recipe_overrides_encoding_and_devices_give_one_line_errors(tmp_path, capsys) -> None:
    from kdistill.cli import main  # in process: eight interpreters would take a minute

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: r\ntask: causal\nstudent: {model: gpt2}\ndata: {train: {source: train.jsonl}}\n"
                      "objective: [{kind: ce}]\ntraining: {learning_rate: 1.0e-4}\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00name: r\n")
    cases = [
        (["validate", str(recipe), "training.learning_rate=[1"],
         "override 'training.learning_rate=[1': malformed YAML value"),
        (["validate", str(recipe), "training.learning_rate=fast"],
         "override 'training.learning_rate=fast', training.learning_rate: Input should be a valid number"),
        (["validate", str(recipe), "a.b=c"], "override 'a.b=c', a: unknown field"),
        (["validate", str(recipe), "=3"], "override '=3': empty key"),
        (["validate", str(binary)], f"{binary}: not UTF-8 text (byte 0)"),
        (["evaluate", str(tmp_path), "--device", "tpu"], "--device 'tpu': expected cpu, cuda, cuda:N or mps"),
        (["evaluate", str(tmp_path), "--text-column", "sentence", "--max-length", "64"],
         "--text-column, --max-length: without RUN_DIR only"),
        (["example", "--steps", "2", "--output", str(tmp_path / "no-such-dir" / "m.json")],
         f"--output {tmp_path / 'no-such-dir' / 'm.json'} is in a folder that does not exist"),
    ]
    for args, message in cases:
        code = main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (args, lines)
        assert lines[0].startswith(f"kdistill: error: {message}"), (args, lines)
    assert main(["validate", str(recipe), "training.max_steps=5"]) == 0


def test_usage_mistakes_are_one_line_naming_the_command() -> None:
    cases = [(["losses", "forward_kl"], "kdistill losses: error: unrecognized arguments: forward_kl "
                                       "(see kdistill losses --help)"),
             (["example", "--steps", "abc"], "kdistill example: error: argument --steps: invalid int value: 'abc'"),
             (["distill"], "kdistill distill: error: the following arguments are required: recipe (see")]
    for args, message in cases:
        result = _run(*args)
        assert result.returncode == 2 and result.stderr.strip().startswith(message), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_distill_says_which_weights_the_student_holds_and_how_many_processes(tmp_path, monkeypatch, capsys) -> None:
    """The exported student is the best evaluation's, which the last line of evals need not be."""
    import kdistill.distill.pipeline as pipeline
    from kdistill.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: r\ntask: classification\nstudent: {model: bert}\ndata: {train: {source: train.jsonl}}\n"
                      "objective: [{kind: ce}]\n")
    summary = {"run_dir": str(tmp_path / "run"), "parameters": {"student": {"total": 1000}},
               "final_eval": {"accuracy": 0.5}, "best_step": 10, "best_metric": 0.55, "steps": 20,
               "stopped_early": False, "train_seconds": 3.0, "processes": 2}
    monkeypatch.setattr(pipeline, "run_distill", lambda *a, **k: summary)
    assert main(["distill", str(recipe), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "final eval: accuracy 0.5000" in out
    assert "the student holds the best evaluated weights: step 10, accuracy 0.5500" in out
    assert "steps 20, 3.0 s in 2 processes;" in out
    monkeypatch.setattr(pipeline, "run_distill", lambda *a, **k: {**summary, "best_step": 20, "processes": 1})
    assert main(["distill", str(recipe), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "best evaluated" not in out and "steps 20, 3.0 s;" in out
