"""`kdistill augment` with a real local model, and the real + synthetic training mix."""

from __future__ import annotations

import json

import pytest

import kdistill.distill.pipeline as pipeline
from kdistill.cli import main
from kdistill.distill.pipeline import build_job, run_distill
from kdistill.recipe import parse_recipe


def _recipe(tmp_path, assets, teacher_model, extra: str = "") -> str:
    return f"""
name: aug
task: classification
output_dir: {tmp_path / 'aug'}
student:
  model: {assets['bert-cls']}
data:
  train: {{source: {assets['train']}}}
  validation: {{source: {assets['dev']}}}
  labels: ['0', '1']
  max_length: 24
objective:
  - {{kind: ce}}
training: {{per_device_train_batch_size: 16, max_steps: 4, learning_rate: 1.0e-3}}
augment:
  teacher: {{backend: local, model: {teacher_model}, batch_size: 4}}
  text_type: movie review
  label_type: sentiment
  verbalizers: [negative, positive]
  num_examples: 3
  max_new_tokens: 12
  ratio: 0.5
{extra}"""


@pytest.mark.parametrize("labels", ["['0', '1']", "[negative, positive]"])  # the data's labels are 0 and 1
def test_augment_with_a_real_local_model_that_writes_nonsense(tmp_path, tiny_assets, capsys, labels) -> None:
    """A random tiny GPT-2 never writes '(sentiment: ...)': every output is dropped, the run says so
    in one line (exit 2) and still writes the data card and the recorded teacher calls. Integer labels
    index named classes, as in kdistill distill."""
    path = tmp_path / "aug.yaml"
    path.write_text(_recipe(tmp_path, tiny_assets, tiny_assets["gpt2"]).replace("labels: ['0', '1']",
                                                                                f"labels: {labels}"))
    assert main(["augment", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unparsable" in err[0]
    card = json.loads((tmp_path / "aug" / "data" / "data_card.json").read_text())
    assert card["counts"]["synthetic_rows"] == 0 and card["counts"]["dropped_unparsable"] == card["counts"]["prompts"]
    assert "Each item in the following list contains a movie review" in card["prompt_templates"]["prompt"]
    assert (tmp_path / "aug" / "data" / "teacher_calls.sqlite").stat().st_size > 0


def test_training_mixes_synthetic_rows_at_the_ratio(tmp_path, tiny_assets, monkeypatch) -> None:
    recipe = parse_recipe(_recipe(tmp_path, tiny_assets, tiny_assets["gpt2"]))
    data = tmp_path / "aug" / "data"
    data.mkdir(parents=True)
    rows = [{"id": f"0-{i}", "text": "the movie was great fun", "label": "positive", "probs": [0.2, 0.8],
             "source": "synthetic"} for i in range(100)]
    (data / "synthetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from kdistill.blackbox.augment_run import synthetic_rows

    mixed = synthetic_rows(recipe, 96, ["0", "1"])
    assert len(mixed) == 48 and mixed[0] == {"text": "the movie was great fun", "label": "1", "probs": [0.2, 0.8]}
    jobs = []

    def spy_build_job(recipe):
        built = build_job(recipe)
        jobs.append(built[0])
        return built

    monkeypatch.setattr(pipeline, "build_job", spy_build_job)
    summary = run_distill(recipe, progress=False)
    assert summary["steps"] == 4
    # what training saw: the 96 real rows and 48 synthetic ones, these with the teacher's soft labels
    (job,) = jobs
    soft = [ex["soft_labels"] for ex in job.train_examples if ex.get("soft_labels") is not None]
    assert len(job.train_examples) == 96 + 48 and soft == [pytest.approx([0.2, 0.8])] * 48


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": "cut off', "line 2: invalid JSON"),
    ('{"text": "fine film", "probs": [0.3, 0.7]}', "line 2: missing field 'label'"),
    ('{"text": "fine film", "label": "positive"}', "line 2: missing field 'probs'"),
    ('{"text": "fine film", "label": "positive", "probs": [1.0]}', "line 2: probs must be a list of 2"),
])
def test_bad_synthetic_rows_name_the_file_and_line(tmp_path, tiny_assets, line: str, message: str) -> None:
    from kdistill.blackbox.augment_run import synthetic_path, synthetic_rows
    from kdistill.errors import DataError

    recipe = parse_recipe(_recipe(tmp_path, tiny_assets, tiny_assets["gpt2"]))
    path = synthetic_path(recipe)
    path.parent.mkdir(parents=True)
    good = json.dumps({"text": "the movie was great fun", "label": "positive", "probs": [0.2, 0.8]})
    path.write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(DataError, match=f"^{path} {message}"):
        synthetic_rows(recipe, 96, ["0", "1"])
