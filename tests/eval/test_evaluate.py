"""``evaluate_run`` / ``evaluate_pair`` / ``kdistill evaluate`` on tiny runs of ``run_distill``."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from kdistill.distill.pipeline import run_distill
from kdistill.errors import ConfigError
from kdistill.eval.evaluate import DataColumns, evaluate_pair, evaluate_run, register_cli
from kdistill.recipe import parse_recipe

FAST = {"batch_size": 8, "repeats": 1, "warmup": 0, "new_tokens": 2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/eval/conftest.py


def _run(tmp_path: Path, assets: dict, task: str, name: str, validation: str | None = None) -> Path:
    teacher = {"classification": assets["bert-cls"], "causal": assets["gpt2"]}[task]
    text = f"""
name: {name}
task: {task}
output_dir: {tmp_path / name}
teacher: {teacher}
student:
  init_from_teacher: {{strategy: uniform, num_layers: 2}}
data:
  train: {{source: {assets['train']}}}
  {validation or f"validation: {{source: {assets['dev']}}}"}
  max_length: 16
objective:
  - {{kind: forward_kl, temperature: 2.0}}
  - {{kind: ce}}
training:
  per_device_train_batch_size: 16
  learning_rate: 2.0e-3
  max_steps: 4
  eval_steps: 2
  logging_steps: 1
  seed: 7
"""
    run_distill(parse_recipe(text), progress=False)
    return tmp_path / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_assets) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-runs")
    return {task: _run(root, tiny_assets, task, f"{task}-run") for task in ("classification", "causal")}


def _no_external_urls(html: str) -> None:
    assert 'src="http' not in html and "href=\"http" not in html
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html)


def test_evaluate_run_classification_writes_the_report(runs) -> None:
    metrics = evaluate_run(runs["classification"], **FAST)
    report = runs["classification"] / "report"
    assert {"metrics.json", "report.md", "report.html", "training_curves.png", "quality_vs_size.png",
            "quality_vs_speed.png", "reliability.png"} <= {p.name for p in report.iterdir()}
    saved = json.loads((report / "metrics.json").read_text())
    teacher, student = saved["models"]["teacher"], saved["models"]["student"]
    assert saved["run"].startswith("classification-run@") and saved["data"]["examples"] == 32
    assert student["size"]["parameters"]["total"] < teacher["size"]["parameters"]["total"]
    assert student["size"]["file_bytes"] > 0 and teacher["size"]["fp32_bytes"] == 4 * teacher["size"]["parameters"]["total"]
    for m in (teacher, student):
        assert 0 <= m["quality"]["accuracy"] <= 1 and 0 <= m["quality"]["ece"] <= 1
        assert len(m["quality"]["reliability"]) == 15
        assert m["speed"]["latency_ms"] > 0 and m["speed"]["examples_per_s"] > 0
    assert 0 <= student["vs_teacher"]["agreement"] <= 1 and student["vs_teacher"]["kl"] >= 0
    assert saved["training"]["steps"] == 4
    text = saved["headline"]["text"]
    assert re.fullmatch(r"\d+% fewer parameters, [\d.]+× (faster|slower), [\d.]+% of the teacher's accuracy", text)
    assert metrics["headline"]["text"] == text and metrics["report"]["html"].endswith("report.html")
    html = (report / "report.html").read_text()
    _no_external_urls(html)
    assert html.count("data:image/png;base64,") == 4 and text.replace("'", "&#x27;") in html


def test_evaluate_run_causal_writes_the_report(runs) -> None:
    evaluate_run(runs["causal"], **FAST)
    report = runs["causal"] / "report"
    saved = json.loads((report / "metrics.json").read_text())
    student = saved["models"]["student"]
    assert student["quality"]["perplexity"] > 1 and saved["models"]["teacher"]["quality"]["perplexity"] > 1
    assert student["vs_teacher"]["tokens"] > 0 and 0 <= student["vs_teacher"]["agreement"] <= 1
    speed = student["speed"]
    assert speed["kind"] == "causal" and speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    assert speed["prompt_tokens"] == 16 and speed["throughput_unit"] == "decode tokens/s"
    assert "perplexity" in saved["headline"]["text"] and "× the teacher's" in saved["headline"]["text"]
    assert {"training_curves.png", "quality_vs_size.png", "quality_vs_speed.png"} <= {p.name for p in report.iterdir()}
    assert "reliability.png" not in {p.name for p in report.iterdir()}
    _no_external_urls((report / "report.html").read_text())


def test_cli_prints_the_table_headline_and_report_location(runs, capsys, tmp_path) -> None:
    parser = argparse.ArgumentParser(prog="kdistill")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", str(runs["classification"]), "--no-speed", "--out", str(tmp_path)])
    args.func(args)
    out = capsys.readouterr().out
    assert "parameters" in out and "accuracy" in out and "agreement vs teacher" in out
    assert "fewer parameters" in out and "of the teacher's accuracy" in out
    assert f"report: {tmp_path / 'report' / 'report.html'}" in out
    with pytest.raises(ConfigError, match="missing --student, --task"):
        args = parser.parse_args(["evaluate", "--teacher", "x", "--data", "y"])
        args.func(args)


def test_cli_pair_mode(tiny_assets, runs, capsys, tmp_path) -> None:
    parser = argparse.ArgumentParser(prog="kdistill")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "--teacher", str(tiny_assets["gpt2"]), "--student",
                              str(runs["causal"] / "student"), "--task", "causal", "--data", str(tiny_assets["dev"]),
                              "--max-length", "16", "--no-speed", "--out", str(tmp_path)])
    args.func(args)
    out = capsys.readouterr().out
    assert "perplexity" in out and "× the teacher's" in out
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["run"].startswith("pair:") and "speed" not in saved["models"]["student"]


def test_non_comparable_teacher_and_student_are_refused(tiny_assets, tmp_path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_assets["bert-cls"])
    three = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=16, num_labels=3))
    three.save_pretrained(tmp_path / "three")
    tok.save_pretrained(tmp_path / "three")
    rows = [json.loads(line) for line in tiny_assets["dev"].read_text().splitlines()]
    with pytest.raises(ConfigError, match="not comparable on accuracy: the teacher has 2 labels, the student 3"):
        evaluate_pair(str(tiny_assets["bert-cls"]), str(tmp_path / "three"), "classification", rows, speed=False)

    other = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64))
    other.save_pretrained(tmp_path / "other-vocab")
    tok.save_pretrained(tmp_path / "other-vocab")  # a BERT vocabulary: not the teacher's
    with pytest.raises(ConfigError, match="not comparable on perplexity, KL and agreement: their tokenizers differ"):
        evaluate_pair(str(tiny_assets["gpt2"]), str(tmp_path / "other-vocab"), "causal", rows, speed=False)


def test_label_names_must_match_the_heads(tiny_assets) -> None:
    rows = [json.loads(line) for line in tiny_assets["dev"].read_text().splitlines()]
    cols = DataColumns(labels=["a", "b", "c"])  # the heads have 2 classes
    with pytest.raises(ConfigError, match=r"^3 label names \(a, b, c\) for heads of 2 classes"):
        evaluate_pair(str(tiny_assets["bert-cls"]), str(tiny_assets["bert-cls"]), "classification", rows,
                      columns=cols, speed=False)
    # no names anywhere (the heads say LABEL_0, LABEL_1): the rows' labels are class indices
    plain = evaluate_pair(str(tiny_assets["bert-cls"]), str(tiny_assets["bert-cls"]), "classification", rows,
                          speed=False)
    assert plain["models"]["student"]["vs_teacher"]["agreement"] == 1.0


def test_instruction_data_scores_greedy_generations_with_rouge_l(tiny_assets) -> None:
    rows = [{"instruction": "is the movie good", "input": "", "output": "the movie was good"},
            {"instruction": "was the film dull", "input": "the plot", "output": "the film was very dull"}]
    cols = DataColumns(format="instruction", max_length=64)

    def evaluate(rows):
        return evaluate_pair(str(tiny_assets["gpt2"]), str(tiny_assets["gpt2"]), "causal", rows, columns=cols,
                             max_new_tokens=4, speed=False)

    # greedy outputs depend on the prompts only: learn them, then give references that half overlap them
    samples = evaluate(rows)["models"]["teacher"]["quality"]["samples"]
    assert len(samples) == 2 and all(s.split() for s in samples)
    rows = [{**row, "output": f"{sample} unrelated closing words"} for row, sample in zip(rows, samples)]
    metrics = evaluate(rows)
    teacher, student = metrics["models"]["teacher"]["quality"], metrics["models"]["student"]["quality"]
    assert teacher["samples"] == samples and teacher["rouge_l_examples"] == 2
    reference = pytest.importorskip("rouge_score.rouge_scorer").RougeScorer(["rougeL"])
    expected = sum(reference.score(r["output"], s)["rougeL"].fmeasure for r, s in zip(rows, samples)) / 2
    assert 0 < expected < 1 and teacher["rouge_l"] == pytest.approx(expected)
    assert student["rouge_l"] == teacher["rouge_l"] and student["samples"] == teacher["samples"]  # the same model
    assert metrics["primary_metric"]["name"] == "rouge_l"
    assert metrics["models"]["student"]["vs_teacher"]["agreement"] == 1.0


@pytest.mark.parametrize(("extra", "message"), [
    (["--task", "causal", "--labels", "neg,pos", "--text-pair-column", "label"],
     "--labels, --text-pair-column: for --task classification only"),
    (["--task", "causal", "--max-generate", "4", "--max-new-tokens", "2"],
     "--max-generate, --max-new-tokens: for --format instruction only"),
])
def test_cli_pair_mode_refuses_options_that_would_have_no_effect(tiny_assets, tmp_path, extra, message) -> None:
    parser = argparse.ArgumentParser(prog="kdistill")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "--teacher", str(tiny_assets["gpt2"]), "--student", str(tiny_assets["gpt2"]),
                              "--data", str(tiny_assets["dev"]), "--no-speed", "--out", str(tmp_path), *extra])
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        args.func(args)
    assert not (tmp_path / "report").exists()


def test_evaluate_run_scores_the_validation_fraction_distill_held_out(tiny_assets, tmp_path) -> None:
    """With ``validation_fraction`` (no ``data.labels``), evaluate scores the rows distill held out,
    with the class names distill trained with."""
    from kdistill.data import load_rows
    from kdistill.data.sources import split_positions

    run = _run(tmp_path, tiny_assets, "classification", "fraction", validation="validation_fraction: 0.25")
    rows = load_rows(str(tiny_assets["train"]))
    _, held_out = split_positions(len(rows), validation_fraction=0.25, seed=7)
    saved = evaluate_run(run, **FAST, speed=False)
    assert saved["data"]["examples"] == len(held_out)
    assert "validation_fraction 0.25" in saved["data"]["source"]
    assert 0 <= saved["models"]["student"]["quality"]["accuracy"] <= 1
