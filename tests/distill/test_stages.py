"""``kdistill run``: finished stages are skipped, and a stage whose input files changed runs again,
with every stage after it (``kdistill.stage_inputs``)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from test_engine import _recipe

from kdistill.recipe import parse_recipe
from kdistill.stages import _set_aside, run_stages

QUICK = {"speed": False}


@pytest.fixture
def recipe_text(tmp_path, tiny_assets):
    train = tmp_path / "train.jsonl"
    train.write_text(Path(tiny_assets["train"]).read_text())
    return _recipe(tmp_path, tiny_assets).replace(str(tiny_assets["train"]), str(train)), train


def _run(text: str, **kwargs) -> tuple[dict, list[str]]:
    lines: list[str] = []
    outcome = run_stages(parse_recipe(text), report=lines.append, evaluate_options=QUICK, **kwargs)
    return outcome, lines


def test_edited_training_data_reruns_distill_and_evaluate(tmp_path, recipe_text) -> None:
    text, train = recipe_text
    first, _ = _run(text)
    assert set(first["stages"]) == {"distill", "evaluate"} and "skipped" not in first["stages"].values()
    student = (tmp_path / "run" / "student" / "model.safetensors").read_bytes()
    second, _ = _run(text)
    assert second["stages"] == {"distill": "skipped", "evaluate": "skipped"}

    rows = train.read_text().splitlines()
    train.write_text("\n".join(rows[: len(rows) // 2]) + "\n")  # half the data
    third, lines = _run(text)
    assert "skipped" not in third["stages"].values()
    assert f"distill: {train} changed since it ran; running it and the stages after it again" in lines
    assert (tmp_path / "run" / "student" / "model.safetensors").read_bytes() != student
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6
    fourth, _ = _run(text)
    assert fourth["stages"] == {"distill": "skipped", "evaluate": "skipped"}


def test_a_stage_finished_by_its_own_command_is_recorded_when_first_skipped(tmp_path, recipe_text) -> None:
    from kdistill.distill.pipeline import run_distill

    text, train = recipe_text
    run_distill(parse_recipe(text), progress=False)
    outcome, _ = _run(text)
    assert outcome["stages"]["distill"] == "skipped" and outcome["stages"]["evaluate"] != "skipped"
    record = json.loads((tmp_path / "run" / "stage_inputs.json").read_text())
    assert set(record) == {"distill", "evaluate"} and str(train) in record["distill"]["files"]
    assert record["distill"]["finished"] and record["evaluate"]["finished"]
    train.write_text(train.read_text() + json.dumps({"text": "an added row", "label": 1}) + "\n")
    again, lines = _run(text)
    assert again["stages"]["distill"] != "skipped" and any("changed since it ran" in line for line in lines)


def test_only_reruns_one_stage_and_the_next_run_catches_up(tmp_path, recipe_text) -> None:
    text, train = recipe_text
    _run(text)
    train.write_text(train.read_text() + json.dumps({"text": "one more", "label": 0}) + "\n")
    only, _ = _run(text, only="distill")
    assert list(only["stages"]) == ["distill"]
    after, lines = _run(text)  # distill ran on the new data; evaluate has not yet
    assert after["stages"]["distill"] == "skipped" and after["stages"]["evaluate"] != "skipped"
    assert f"evaluate: {train} changed since it ran; running it and the stages after it again" in lines


def test_stale_cache_is_moved_aside_and_rewritten(tmp_path, tiny_assets) -> None:
    train = tmp_path / "lm.jsonl"
    train.write_text("".join(json.dumps({"text": f"the movie number {i} was good fun"}) + "\n" for i in range(40)))
    text = _recipe(tmp_path, tiny_assets, task="causal", objective="  - {kind: forward_kl}\n",
                   max_steps=2).replace(str(tiny_assets["train"]), str(train))
    text = text.replace(f"  validation: {{source: {tiny_assets['dev']}}}\n", "  validation_fraction: 0.25\n")
    text += "signal: {source: cache, k: 8, batch_size: 4}\n"
    first, _ = _run(text)
    assert list(first["stages"]) == ["cache", "distill", "evaluate"]
    old_manifest = (tmp_path / "run" / "cache" / "manifest.json").read_text()
    train.write_text(train.read_text() + json.dumps({"text": "a new row about another movie"}) + "\n")
    again, lines = _run(text)
    assert "skipped" not in again["stages"].values(), lines
    backups = list((tmp_path / "run").glob("cache.replaced-*"))
    assert len(backups) == 1 and (backups[0] / "manifest.json").read_text() == old_manifest
    assert json.loads((tmp_path / "run" / "cache" / "manifest.json").read_text())["n_examples"] == 31  # 41 rows, 10 held out


def test_set_aside_keeps_the_teacher_calls_of_generated_data(tmp_path) -> None:
    text = (f"name: g\ntask: causal\noutput_dir: {tmp_path / 'run'}\nstudent: {{model: x}}\n"
            f"data: {{train: {{source: {tmp_path / 'run' / 'data' / 'data.jsonl'}}}}}\n"
            "objective: [{kind: ce}]\n")
    recipe = parse_recipe(text)
    data = tmp_path / "run" / "data"
    data.mkdir(parents=True)
    (data / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    with sqlite3.connect(data / "teacher_calls.sqlite") as db:
        db.execute("create table calls (k text)")
        db.execute("insert into calls values ('prompt')")
    lines: list[str] = []
    _set_aside(recipe, "generate", lines.append)
    backup = next((tmp_path / "run").glob("data.replaced-*"))
    assert (backup / "data.jsonl").is_file() and not (data / "data.jsonl").exists()
    with sqlite3.connect(data / "teacher_calls.sqlite") as db:
        assert db.execute("select k from calls").fetchall() == [("prompt",)]
    assert f"generate: its earlier data moved to {backup}; the teacher calls are kept for replay" in lines


def test_a_data_file_gone_since_the_run_is_reported_and_nothing_is_lost(tmp_path, recipe_text) -> None:
    from kdistill.errors import DataError

    text, train = recipe_text
    _run(text)
    student = (tmp_path / "run" / "student" / "model.safetensors").read_bytes()
    train.rename(train.with_suffix(".moved"))
    lines: list[str] = []
    with pytest.raises(DataError, match="file not found"):
        run_stages(parse_recipe(text), report=lines.append, evaluate_options=QUICK)
    assert f"distill: {train} was removed since it ran; running it and the stages after it again" in lines
    assert (tmp_path / "run" / "student" / "model.safetensors").read_bytes() == student


def test_outputs_of_an_earlier_run_are_not_taken_for_a_failed_run_on_new_data(capsys, tmp_path, recipe_text) -> None:
    """Data edited into something distill refuses: the earlier student stays, but a second run on the
    same data must not skip distill as 'finished' (its outputs are of the old data)."""
    from kdistill.errors import DataError

    text, train = recipe_text
    _run(text)
    train.write_text(train.read_text() + json.dumps({"text": "a row with a new label", "label": 7}) + "\n")
    for attempt in range(2):
        lines: list[str] = []
        with pytest.raises(DataError):
            run_stages(parse_recipe(text), report=lines.append, evaluate_options=QUICK)
        assert not any("finished earlier, skipped" in line for line in lines), (attempt, lines)
    assert "distill: its outputs are from a run on other inputs; running it and the stages after it again" in lines
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()  # the earlier student is kept


def test_freed_memory_goes_back_after_each_stage_that_ran(tmp_path, recipe_text, monkeypatch) -> None:
    """The stages share one process: after each one that ran (not a skipped one), before the next
    starts, garbage is collected and the C heap trimmed."""
    import kdistill.distill.memory as memory
    import kdistill.stages as stages

    events: list[str] = []
    run_stage, trim = stages._run_stage, memory.return_free_memory
    monkeypatch.setattr(stages, "_run_stage", lambda recipe, stage, **kw: events.append(stage) or run_stage(
        recipe, stage, **kw))
    monkeypatch.setattr(memory, "return_free_memory", lambda: events.append("trim") or trim())
    text, _ = recipe_text
    _run(text)
    assert events == ["distill", "trim", "evaluate", "trim"]
    events.clear()
    _run(text)
    assert events == []  # both skipped
