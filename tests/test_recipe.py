"""Recipe schema: validation errors name the file, line and field; overrides; defaults written out."""

from __future__ import annotations

import re

import pytest
import yaml

from kdistill.errors import ConfigError
from kdistill.recipe import apply_overrides, dump_recipe, load_recipe, parse_recipe

BASE = """\
name: demo
task: classification
teacher: some/teacher
student:
  init_from_teacher: {strategy: uniform, num_layers: 2}
data:
  train: {source: train.jsonl}
objective:
  - kind: forward_kl
    temperature: 2.0
  - kind: ce
"""


def test_valid_recipe_fills_defaults_and_round_trips() -> None:
    recipe = parse_recipe(BASE)
    assert recipe.teachers[0].model == "some/teacher" and recipe.teachers[0].weight == 1.0
    assert recipe.training.per_device_train_batch_size == 16
    assert str(recipe.run_dir) == "runs/demo"
    again = parse_recipe(dump_recipe(recipe))
    assert again == recipe


def test_malformed_yaml_names_the_line() -> None:
    with pytest.raises(ConfigError, match=r"^r\.yaml line 4: malformed YAML: .* from line 3\)"):
        parse_recipe("name: x\nstudent:\n  model: [a, b\n", "r.yaml")


def test_unknown_loss_kind_names_line_and_field() -> None:
    text = BASE.replace("kind: forward_kl", "kind: kl_div")
    with pytest.raises(ConfigError, match=r"^r\.yaml line 9, objective\.0\.kind: unknown loss kind 'kl_div'"):
        parse_recipe(text, "r.yaml")


def test_unknown_and_missing_fields() -> None:
    with pytest.raises(ConfigError, match=r"line 7, data\.train\.sourc: unknown field"):
        parse_recipe(BASE.replace("{source: train.jsonl}", "{sourc: train.jsonl}"), "r.yaml")
    with pytest.raises(ConfigError, match=r"data\.train\.source: required field is missing"):
        parse_recipe(BASE.replace("{source: train.jsonl}", "{format: jsonl}"), "r.yaml")
    with pytest.raises(ConfigError, match=r"training\.learning_rate: Input should be greater than 0"):
        parse_recipe(BASE + "training: {learning_rate: -1}\n", "r.yaml")


def test_terms_that_need_a_teacher_without_one() -> None:
    text = BASE.replace("teacher: some/teacher\n", "").replace(
        "init_from_teacher: {strategy: uniform, num_layers: 2}", "model: some/student")
    with pytest.raises(ConfigError, match="need a teacher"):
        parse_recipe(text)
    fine_tune = text.replace("  - kind: forward_kl\n    temperature: 2.0\n", "")
    assert parse_recipe(fine_tune).teachers == []


def test_student_needs_exactly_one_source() -> None:
    text = BASE.replace("init_from_teacher: {strategy: uniform, num_layers: 2}",
                        "model: x\n  init_from_teacher: {strategy: first, num_layers: 1}")
    with pytest.raises(ConfigError, match="exactly one of student.model and student.init_from_teacher"):
        parse_recipe(text)


def test_overrides_set_nested_values_and_list_items() -> None:
    recipe = parse_recipe(BASE, overrides=["training.learning_rate=1e-4", "objective.0.weight=3",
                                           "data.max_length=64", "output_dir=/tmp/x"])
    assert recipe.training.learning_rate == 1e-4
    assert recipe.objective[0].weight == 3.0
    assert recipe.data.max_length == 64 and str(recipe.run_dir) == "/tmp/x"
    with pytest.raises(ConfigError, match="not of the form"):
        parse_recipe(BASE, overrides=["training.learning_rate"])
    with pytest.raises(ConfigError, match="has no item 5"):
        apply_overrides(yaml.safe_load(BASE), ["objective.5.weight=1"])


def test_load_recipe_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", ["recipes/distilbert.yaml", "recipes/sst2-minilm.yaml", "recipes/gemma-kd.yaml", "recipes/demo.yaml",
                                  "recipes/sst2-minilm-teacher.yaml"])
def test_shipped_recipes_validate(path: str) -> None:
    assert load_recipe(path).objective


def test_a_key_written_twice_names_both_lines() -> None:
    text = BASE + "training:\n  max_steps: 3\ntraining:\n  learning_rate: 1.0e-4\n"  # BASE has 11 lines
    with pytest.raises(ConfigError, match=r"^r\.yaml line 14: duplicate key 'training' \(first at line 12\)"):
        parse_recipe(text, "r.yaml")
    nested = BASE + "training:\n  max_steps: 3\n  max_steps: 4\n"
    with pytest.raises(ConfigError, match=r"^r\.yaml line 14: duplicate key 'max_steps' \(first at line 13\)"):
        parse_recipe(nested, "r.yaml")


@pytest.mark.parametrize(("labels", "message"), [
    ("[]", r"line 8, data\.labels: List should have at least 2 items"),
    ("['pos']", r"line 8, data\.labels: List should have at least 2 items"),
    ("['pos', 'neg', 'pos']", r"line 8, data\.labels: label names must differ; repeated: 'pos'"),
])
def test_label_sets_a_classifier_cannot_use_are_refused(labels: str, message: str) -> None:
    text = BASE.replace("  train: {source: train.jsonl}\n", f"  train: {{source: train.jsonl}}\n  labels: {labels}\n")
    with pytest.raises(ConfigError, match=rf"^r\.yaml {message}"):
        parse_recipe(text, "r.yaml")


def test_early_stopping_needs_a_validation_split_and_eval_steps() -> None:
    with pytest.raises(ConfigError, match=r"^r\.yaml line 12, training\.early_stopping_patience: needs a validation "
                                          r"split to watch: give data\.validation or data\.validation_fraction$"):
        parse_recipe(BASE + "training: {early_stopping_patience: 2, eval_steps: 5}\n", "r.yaml")
    split = BASE.replace("  train: {source: train.jsonl}\n", "  train: {source: train.jsonl}\n"
                                                              "  validation_fraction: 0.2\n")
    with pytest.raises(ConfigError, match=r"line 13, training\.early_stopping_patience: needs training\.eval_steps"):
        parse_recipe(split + "training: {early_stopping_patience: 2}\n", "r.yaml")
    recipe = parse_recipe(split + "training: {early_stopping_patience: 2, eval_steps: 5}\n", "r.yaml")
    assert recipe.training.early_stopping_patience == 2


GENERATE = """\
name: g
task: causal
student: {model: some/student}
data: {train: {source: d.jsonl}, format: instruction}
objective: [{kind: ce}]
generate:
  teacher: TEACHER
"""


@pytest.mark.parametrize(("teacher", "message"), [
    ("{backend: local, model: m, max_requests: 1}", "max_requests has no effect with backend local (it is for "
                                                    "backend openai)"),
    ("{backend: local, model: m, chat: true}", "chat has no effect with backend local"),
    ("{backend: replay, model: m, replay_file: r.sqlite, replay: false}", "replay has no effect with backend "
                                                                         "replay (it is for backend local or openai)"),
    ("{backend: replay, model: m, replay_file: r.sqlite, dtype: bfloat16}", "dtype has no effect with backend replay"),
    ("{backend: openai, model: m, base_url: 'http://x/v1', replay_file: r.sqlite}", "replay_file has no effect with "
                                                                                   "backend openai"),
])
def test_teacher_settings_another_backend_uses_are_refused(teacher: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^r\.yaml line 7, generate\.teacher: {re.escape(message)}"):
        parse_recipe(GENERATE.replace("TEACHER", teacher), "r.yaml")


def test_a_written_out_recipe_with_every_teacher_default_is_valid() -> None:
    recipe = parse_recipe(GENERATE.replace("TEACHER", "{backend: replay, model: m, replay_file: r.sqlite}"))
    again = parse_recipe(dump_recipe(recipe))  # api_key_env, chat, max_concurrency ... written out at their defaults
    assert again == recipe and again.generate.teacher.api_key_env == "OPENAI_API_KEY"


def test_generate_needs_a_causal_task() -> None:
    text = GENERATE.replace("TEACHER", "{backend: local, model: m}").replace("task: causal", "task: classification")
    text = text.replace(", format: instruction", "")
    with pytest.raises(ConfigError, match=r"generate \(Self-Instruct\) makes instruction data for a causal LM; "
                                          r"task is classification"):
        parse_recipe(text, "r.yaml")


def test_verbalizers_the_teacher_could_not_write_back_are_refused() -> None:
    text = BASE + ("augment:\n  teacher: {backend: local, model: m}\n  text_type: review\n  label_type: sentiment\n"
                   "  verbalizers: ['good :)', bad]\n")
    with pytest.raises(ConfigError, match=r"augment\.verbalizers: verbalizer 'good :\)' could never be read back"):
        parse_recipe(text, "r.yaml")
