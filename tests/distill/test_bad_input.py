"""User mistakes reach the command line as one line on stderr and exit status 2, nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_engine import _recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdistill.cli import main


def _distill(capsys, tmp_path, text: str, *extra: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    code = main(["distill", str(path), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("kdistill: error: ")
    return err


def _distill_patched(tmp_path: Path, text: str, patch: str) -> subprocess.CompletedProcess:
    """``kdistill distill`` of recipe ``text`` in a fresh interpreter after running ``patch`` (Python source)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    script = (f"import sys\n{patch}\nfrom kdistill.cli import main\n"
              f"sys.exit(main(['distill', {str(recipe)!r}, '--no-progress']))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


def test_layer_index_out_of_range(capsys, tmp_path, tiny_assets) -> None:
    text = _recipe(tmp_path, tiny_assets, student="  init_from_teacher: {strategy: explicit, layers: [0, 9]}\n")
    assert "layer index 9 out of range for a teacher with 4 layers" in _distill(capsys, tmp_path, text)


def test_missing_column_and_bad_label_name_the_row(capsys, tmp_path, tiny_assets) -> None:
    text = _recipe(tmp_path, tiny_assets).replace("max_length: 16", "max_length: 16\n  text_column: sentence")
    assert "missing column 'sentence'" in _distill(capsys, tmp_path, text)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good movie", "label": 1}\n{"text": "bad movie", "label": 7}\n')
    text = _recipe(tmp_path, tiny_assets).replace(str(tiny_assets["train"]), str(bad)).replace(
        "max_length: 16", "max_length: 16\n  labels: ['0', '1']")
    err = _distill(capsys, tmp_path, text)
    assert "bad.jsonl row 2: label 7 is not in the label set ['0', '1']" in err, err  # its line 2


def test_rows_are_named_by_their_number_in_the_file_after_a_validation_split(capsys, tmp_path, tiny_assets) -> None:
    """With ``validation_fraction`` the rows of both parts keep their numbers in the file (= its lines)."""
    from kdistill.data.sources import split_positions

    train_idx, held_out_idx = split_positions(12, validation_fraction=0.25, seed=7)
    for position in (train_idx[-2], held_out_idx[-1]):  # a training row past a held-out one, a held-out row
        rows = [{"text": f"movie {i}", "label": i % 2} for i in range(12)]
        rows[position]["label"] = 7
        data = tmp_path / "rows.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        text = _recipe(tmp_path, tiny_assets).replace(str(tiny_assets["train"]), str(data)).replace(
            f"  validation: {{source: {tiny_assets['dev']}}}\n", "  validation_fraction: 0.25\n").replace(
            "max_length: 16", "max_length: 16\n  labels: ['0', '1']")
        err = _distill(capsys, tmp_path, text)
        assert f"rows.jsonl row {position + 1}: label 7 is not in the label set" in err, (position, err)


def test_labels_that_do_not_fit_the_teachers_head_name_the_rarest_row(capsys, tmp_path, tiny_assets) -> None:
    rows = [{"text": f"movie {i}", "label": ["neg", "pos"][i % 2]} for i in range(9)]
    rows[5]["label"] = "poss"  # a typo: a third label the 2-class teacher cannot score
    data = tmp_path / "typo.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = _recipe(tmp_path, tiny_assets).replace(str(tiny_assets["train"]), str(data))
    err = _distill(capsys, tmp_path, text)
    assert err.endswith(f"teacher {str(tiny_assets['bert-cls'])!r} classifies into 2 classes but the labels of "
                        f"{data} are 3: 'neg', 'pos', 'poss'; the rarest, 'poss' (1 row), first at row 6"), err
    err = _distill(capsys, tmp_path, text.replace("max_length: 16", "max_length: 16\n  labels: [a, b, c]"))
    assert err.endswith("classifies into 2 classes but data.labels are 3: 'a', 'b', 'c'"), err
    assert not (tmp_path / "run").exists()


def test_empty_dataset(capsys, tmp_path, tiny_assets) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    text = _recipe(tmp_path, tiny_assets).replace(str(tiny_assets["train"]), str(empty))
    assert "no rows" in _distill(capsys, tmp_path, text)


def test_unknown_loss_kind_and_malformed_yaml(capsys, tmp_path, tiny_assets) -> None:
    text = _recipe(tmp_path, tiny_assets, objective="  - {kind: kl}\n")
    err = _distill(capsys, tmp_path, text)
    assert "objective.0.kind: unknown loss kind 'kl'" in err and "line" in err
    assert "malformed YAML" in _distill(capsys, tmp_path, "name: [x\n")


def test_different_tokenizers_for_response_terms(capsys, tmp_path, tiny_assets) -> None:
    other = tmp_path / "other-gpt2"
    AutoModelForCausalLM.from_pretrained(tiny_assets["gpt2"]).save_pretrained(other)
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["gpt2"])
    tokenizer.add_tokens(["brandnew"])
    tokenizer.save_pretrained(other)
    text = _recipe(tmp_path, tiny_assets, "causal", student=f"  model: {other}\n")
    assert "different tokenizers" in _distill(capsys, tmp_path, text)


def test_other_recipe_in_run_dir_is_refused_without_force(capsys, tmp_path, tiny_assets) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(_recipe(tmp_path, tiny_assets))
    assert main(["distill", str(path), "--no-progress"]) == 0
    capsys.readouterr()
    before = (tmp_path / "run" / "student" / "model.safetensors").read_bytes()
    text = _recipe(tmp_path, tiny_assets, objective="  - {kind: ce}\n")
    assert "different recipe" in _distill(capsys, tmp_path, text)
    assert (tmp_path / "run" / "student" / "model.safetensors").read_bytes() == before


def test_nan_loss_exits_2_and_keeps_the_last_checkpoint(tmp_path, tiny_assets) -> None:
    """A teacher whose outputs turn NaN at step 5: the run stops there; checkpoint step-4 stays whole."""
    text = _recipe(tmp_path, tiny_assets, training="  save_steps: 2\n", max_steps=8)
    result = _distill_patched(tmp_path, text, (
        "import kdistill.signals.live as live\n"
        "orig = live.LiveTeachers.__call__\n"
        "calls = {'n': 0}\n"
        "def poisoned(self, *a, **k):\n"
        "    out = orig(self, *a, **k)\n"
        "    calls['n'] += 1\n"
        "    if calls['n'] > 5:\n"
        "        out[0]['logits'] = out[0]['logits'] * float('nan')\n"
        "    return out\n"
        "live.LiveTeachers.__call__ = poisoned"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("kdistill: error: step 6: loss term forward_kl is nan")
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-000002", "step-000004"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4
    kept = tmp_path / "run" / "checkpoints" / "step-000004"
    weights = load_file(str(kept / "student.safetensors"))  # whole and readable, the NaN step not in it
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    optimizer = torch.load(kept / "optimizer.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for st in optimizer["state"].values() for v in st.values()
               if isinstance(v, torch.Tensor))


def test_force_starts_over_and_bad_input_writes_nothing(capsys, tmp_path, tiny_assets) -> None:
    """--force removes the earlier run's checkpoints, student and report (none of it is taken for
    the new run's); a forced run refused for bad input leaves the directory as it was."""
    text = _recipe(tmp_path, tiny_assets, training="  save_steps: 3\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    run_dir = tmp_path / "run"
    assert main(["distill", str(path), "--no-progress"]) == 0
    (run_dir / "report").mkdir()
    (run_dir / "report" / "report.html").write_text("the first student's report")
    assert main(["distill", str(path), "--no-progress", "--force", "training.max_steps=3"]) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == ["step-000003"]
    assert not (run_dir / "report").exists()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    err = _distill(capsys, tmp_path, text.replace("  - {kind: ce}\n", "  - {kind: hidden_mse, layers: [[7, 9]]}\n"),
                   "--force")
    assert "hidden state index 7 out of range" in err
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_resume_of_a_finished_run_is_refused_and_changes_nothing(capsys, tmp_path, tiny_assets) -> None:
    text = _recipe(tmp_path, tiny_assets, training="  save_steps: 3\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert main(["distill", str(path), "--no-progress"]) == 0
    summary = (tmp_path / "run" / "summary.json").read_bytes()
    capsys.readouterr()
    assert "has finished (summary.json); nothing to resume" in _distill(capsys, tmp_path, text, "--resume")
    assert (tmp_path / "run" / "summary.json").read_bytes() == summary


def test_resume_from_a_truncated_checkpoint_names_the_file(capsys, tmp_path, tiny_assets) -> None:
    text = _recipe(tmp_path, tiny_assets, training="  save_steps: 3\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert main(["distill", str(path), "--no-progress"]) == 0
    (tmp_path / "run" / "summary.json").unlink()  # as if stopped before the end
    weights = tmp_path / "run" / "checkpoints" / "step-000006" / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    err = _distill(capsys, tmp_path, text, "--resume")
    assert "cannot resume from" in err and "step-000006" in err and "header" in err


def test_an_output_dir_that_is_a_file_is_one_line(capsys, tmp_path, tiny_assets) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    err = _distill(capsys, tmp_path, _recipe(tmp_path, tiny_assets))
    assert str(blocker) in err and blocker.read_text() == "not a folder"


def test_ctrl_c_is_one_line_with_exit_130_and_keeps_the_checkpoint(tmp_path, tiny_assets) -> None:
    text = _recipe(tmp_path, tiny_assets, training="  save_steps: 2\n", max_steps=8)
    result = _distill_patched(tmp_path, text, (
        "import kdistill.distill.trainer as trainer\n"
        "check = trainer._check_finite\n"
        "def interrupt(step, values, batch):\n"
        "    if step == 4:\n"
        "        raise KeyboardInterrupt\n"
        "    check(step, values, batch)\n"
        "trainer._check_finite = interrupt"))
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("kdistill: interrupted; what was written is kept")
    assert (tmp_path / "run" / "checkpoints" / "step-000004").is_dir()


def test_a_live_teacher_with_another_tokenizer_is_refused(capsys, tmp_path, tiny_assets) -> None:
    """A classification teacher reads the student's token ids: a student with another vocabulary
    would index past the teacher's embedding (it was an IndexError deep in the teacher)."""
    text = _recipe(tmp_path, tiny_assets, student=f"  model: {tiny_assets['gpt2']}\n")
    err = _distill(capsys, tmp_path, text)
    assert "and the student use different tokenizers; a live teacher reads the student's token ids" in err
    assert not (tmp_path / "run").exists()


def test_a_teacher_without_a_trained_head_is_refused(capsys, tmp_path, tiny_assets) -> None:
    """A causal LM as a classification teacher would get a random classification head: refused
    by name instead of distilling from meaningless targets."""
    text = _recipe(tmp_path, tiny_assets).replace(f"teacher: {tiny_assets['bert-cls']}",
                                                  f"teacher: {tiny_assets['gpt2']}")
    err = _distill(capsys, tmp_path, text)
    assert f"model '{tiny_assets['gpt2']}' has no trained classification head: score.weight not in its" in err
    assert not (tmp_path / "run").exists()
