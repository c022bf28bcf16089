"""The distillation engine end to end on tiny real models saved to disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

import kdistill.distill.trainer as trainer_module
from kdistill.distill.distiller import TrainingError
from kdistill.distill.pipeline import run_distill
from kdistill.errors import ConfigError
from kdistill.recipe import parse_recipe


def _recipe(tmp_path: Path, assets: dict, task: str = "classification", name: str = "run",
            objective: str | None = None, training: str = "", teacher: bool = True, student: str | None = None,
            max_steps: int = 6):
    teacher_dir = {"classification": assets["bert-cls"], "mlm": assets["bert-mlm"], "causal": assets["gpt2"]}[task]
    objective = objective or "  - {kind: forward_kl, temperature: 2.0}\n  - {kind: ce}\n"
    student = student or "  init_from_teacher: {strategy: uniform, num_layers: 2}\n"
    text = f"""
name: {name}
task: {task}
output_dir: {tmp_path / name}
{'teacher: ' + str(teacher_dir) if teacher else ''}
student:
{student}
data:
  train: {{source: {assets['train']}}}
  validation: {{source: {assets['dev']}}}
  max_length: 16
objective:
{objective}
training:
  per_device_train_batch_size: 16
  learning_rate: 2.0e-3
  max_steps: {max_steps}
  eval_steps: 3
  seed: 7
{training}
"""
    return text


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=key)


def test_classification_kd_exports_a_loadable_student(tmp_path, tiny_assets) -> None:
    objective = ("  - {kind: forward_kl, temperature: 2.0}\n  - {kind: ce, weight: 0.5}\n"
                 "  - {kind: hidden_mse, layers: [[-1, -1], [1, 2]]}\n  - {kind: rkd_distance, weight: 0.1}\n")
    summary = run_distill(parse_recipe(_recipe(tmp_path, tiny_assets, objective=objective)), progress=False)
    run_dir = tmp_path / "run"
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "student")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "student")
    assert model.config.num_hidden_layers == 2
    assert summary["parameters"]["student"]["total"] < summary["parameters"]["teacher"]["total"]
    logits = model(**tokenizer(["the movie was good"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert {"forward_kl", "ce", "hidden_mse", "rkd_distance", "tokens_per_s", "lr"} <= train_records[-1].keys()
    assert [r["step"] for r in records if "accuracy" in r] == [3, 6]
    assert (run_dir / "recipe.yaml").read_text().startswith("name: run")
    assert not any(p.name.startswith(".tmp") for p in (run_dir / "checkpoints").iterdir()) if (
        run_dir / "checkpoints").exists() else True


def test_distilbert_style_mlm_with_minilm_relations(tmp_path, tiny_assets) -> None:
    objective = ("  - {kind: soft_ce, temperature: 2.0, weight: 5.0}\n  - {kind: ce, weight: 2.0}\n"
                 "  - {kind: hidden_cosine, layers: [[-1, -1]]}\n"
                 "  - {kind: attention_relation_kl, num_relation_heads: 2, modules: "
                 "[[bert.encoder.layer.1.attention.self.query, bert.encoder.layer.3.attention.self.query]]}\n")
    student = "  init_from_teacher: {strategy: every_other}\n"
    training = "  save_steps: 3\n"
    summary = run_distill(parse_recipe(_recipe(tmp_path, tiny_assets, "mlm", objective=objective,
                                               student=student, training=training)), progress=False)
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "student")
    assert model.config.num_hidden_layers == 2
    assert summary["final_eval"]["perplexity"] > 1.0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "lr" in r][-1]
    assert last["attention_relation_kl"] > 0 and last["soft_ce"] > 0


def test_causal_kd_uses_the_chunked_path_and_learns(tmp_path, tiny_assets, monkeypatch) -> None:
    import kdistill.distill.distiller as distiller_module

    calls = {"chunked": 0, "dense": 0}
    chunked, dense = distiller_module.chunked_distribution_losses, distiller_module.distribution_loss

    def spy_chunked(*args, **kwargs):
        calls["chunked"] += 1
        return chunked(*args, **kwargs)

    def spy_dense(*args, **kwargs):
        calls["dense"] += 1
        return dense(*args, **kwargs)

    monkeypatch.setattr(distiller_module, "chunked_distribution_losses", spy_chunked)
    monkeypatch.setattr(distiller_module, "distribution_loss", spy_dense)
    objective = "  - {kind: reverse_kl}\n  - {kind: ce, weight: 0.0}\n"
    run_distill(parse_recipe(_recipe(tmp_path, tiny_assets, "causal", objective=objective,
                                     training="  logging_steps: 1\n", max_steps=20)), progress=False)
    assert calls["chunked"] >= 20 and calls["dense"] == 0  # one fused chunked pass per step, no (B, L, V) logits
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["reverse_kl"] for r in records if "reverse_kl" in r]
    assert kl[-1] < 0.5 * kl[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert model.config.n_layer == 2


def test_plain_fine_tuning_without_teacher(tmp_path, tiny_assets) -> None:
    text = _recipe(tmp_path, tiny_assets, objective="  - {kind: ce}\n", teacher=False,
                   student=f"  model: {tiny_assets['bert-cls']}\n", max_steps=80)
    summary = run_distill(parse_recipe(text), progress=False)
    assert summary["final_eval"]["accuracy"] >= 0.9  # the label is given away by one keyword
    assert "teacher" not in summary["parameters"]


def test_gradient_accumulation_gives_the_same_student(tmp_path, tiny_assets) -> None:
    base = "  - {kind: forward_kl, temperature: 2.0}\n  - {kind: ce}\n  - {kind: hidden_cosine, layers: [[-1, -1]]}\n"
    one = _recipe(tmp_path, tiny_assets, name="one", objective=base)
    two = _recipe(tmp_path, tiny_assets, name="two", objective=base,
                  training="  gradient_accumulation_steps: 2\n").replace("per_device_train_batch_size: 16",
                                                                         "per_device_train_batch_size: 8")
    run_distill(parse_recipe(one), progress=False)
    run_distill(parse_recipe(two), progress=False)
    _assert_same_weights(_weights(tmp_path / "one"), _weights(tmp_path / "two"))


def test_resume_after_interruption_gives_the_same_student(tmp_path, tiny_assets, monkeypatch) -> None:
    training = "  save_steps: 4\n"
    objective = "  - {kind: jsd, beta: 0.3}\n  - {kind: ce}\n  - {kind: hidden_mse, layers: [[1, 2]]}\n"
    full = _recipe(tmp_path, tiny_assets, name="full", objective=objective, training=training, max_steps=10)
    run_distill(parse_recipe(full), progress=False)

    part = _recipe(tmp_path, tiny_assets, name="part", objective=objective, training=training, max_steps=10)
    original = trainer_module._check_finite

    def interrupt(step, values, batch):
        if step == 6:  # after checkpoint step-4 was written, during step 7
            raise KeyboardInterrupt
        original(step, values, batch)

    monkeypatch.setattr(trainer_module, "_check_finite", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_distill(parse_recipe(part), progress=False)
    monkeypatch.setattr(trainer_module, "_check_finite", original)
    kept = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert kept[-1] == "step-000004" and all(not name.startswith(".tmp") for name in kept)
    saved = torch.load(tmp_path / "part" / "checkpoints" / kept[-1] / "optimizer.pt", weights_only=True)
    assert all(group["fused"] for group in saved["param_groups"])  # one-pass AdamW on CPU, as transformers'
    with pytest.raises(ConfigError, match="--resume"):
        run_distill(parse_recipe(part), progress=False)
    run_distill(parse_recipe(part), resume=True, progress=False)
    _assert_same_weights(_weights(tmp_path / "full"), _weights(tmp_path / "part"), atol=1e-6)
    # the log holds each record once: those the interrupted run wrote after step 4 (its step-6 evaluation)
    # are dropped on resume and written again, so it reads as the uninterrupted run's
    def records(name):
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    part_records, full_records = records("part"), records("full")
    assert [(r["step"], sorted(r)) for r in part_records] == [(r["step"], sorted(r)) for r in full_records]
    for p, f in zip(part_records, full_records):
        assert {k: v for k, v in p.items() if "seconds" not in k and "tokens_per_s" not in k} == pytest.approx(
            {k: v for k, v in f.items() if "seconds" not in k and "tokens_per_s" not in k}, rel=1e-5)


def test_non_finite_loss_stops_with_step_and_term(tmp_path, tiny_assets) -> None:
    bad = tmp_path / "nan-teacher"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_assets["bert-cls"])
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(tiny_assets["bert-cls"]).save_pretrained(bad)
    text = _recipe(tmp_path, tiny_assets).replace(f"teacher: {tiny_assets['bert-cls']}", f"teacher: {bad}")
    text = text.replace("init_from_teacher: {strategy: uniform, num_layers: 2}",
                        f"model: {tiny_assets['bert-cls']}")
    with pytest.raises(TrainingError, match=r"step 1: loss term forward_kl is nan"):
        run_distill(parse_recipe(text), progress=False)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_assets) -> None:
    objective = "  - {kind: forward_kl, temperature: 2.0}\n  - {kind: ce}\n  - {kind: hidden_cosine, layers: [[-1, -1]]}\n"
    single = _recipe(tmp_path, tiny_assets, name="single", objective=objective)
    double = _recipe(tmp_path, tiny_assets, name="double", objective=objective).replace(
        "per_device_train_batch_size: 16", "per_device_train_batch_size: 8")
    run_distill(parse_recipe(single), progress=False)
    recipe_file = tmp_path / "double.yaml"
    recipe_file.write_text(double)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "kdistill", "distill", str(recipe_file), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "double" / "summary.json").read_text())
    assert summary["processes"] == 2
    _assert_same_weights(_weights(tmp_path / "single"), _weights(tmp_path / "double"), atol=1e-5)


def test_ensemble_of_teachers_and_bf16(tmp_path, tiny_assets, monkeypatch) -> None:
    import kdistill.distill.distiller as distiller_module

    second = tmp_path / "second-teacher"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_assets["bert-cls"])
    with torch.no_grad():
        model.classifier.weight.mul_(-3.0)
    model.save_pretrained(second)
    AutoTokenizer.from_pretrained(tiny_assets["bert-cls"]).save_pretrained(second)
    text = _recipe(tmp_path, tiny_assets, objective="  - {kind: forward_kl, temperature: 2.0}\n"
                   "  - {kind: hidden_cosine, layers: [[-1, -1]]}\n", training="  bf16: true\n")
    text = text.replace(f"teacher: {tiny_assets['bert-cls']}",
                        f"teachers:\n  - {{model: {tiny_assets['bert-cls']}, weight: 2}}\n  - {{model: {second}}}")
    mixtures, autocast_dtypes = [], set()
    mix = distiller_module.mixture_logits

    def spy_mixture(logits, weights, temperature):
        mixtures.append((len(logits), list(weights), not torch.equal(logits[0], logits[-1])))
        return mix(logits, weights, temperature)

    def record_autocast(module, args, output):
        if isinstance(module, torch.nn.Linear) and torch.is_autocast_enabled("cpu"):
            autocast_dtypes.add(output.dtype)

    monkeypatch.setattr(distiller_module, "mixture_logits", spy_mixture)
    handle = torch.nn.modules.module.register_module_forward_hook(record_autocast)
    try:
        summary = run_distill(parse_recipe(text), progress=False)
    finally:
        handle.remove()
    assert summary["steps"] == 6
    # every step's soft target mixes both teachers (whose logits differ) at weights 2 : 1
    assert len(mixtures) >= 6
    assert all(n == 2 and w == pytest.approx([2 / 3, 1 / 3]) and differ for n, w, differ in mixtures)
    assert autocast_dtypes == {torch.bfloat16}  # training.bf16: the student's GEMMs ran under bf16 autocast
    last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"lr"' in x][-1]
    assert last["forward_kl"] > 0 and last["hidden_cosine"] > 0


def test_early_stopping_and_keep_last_checkpoints(tmp_path, tiny_assets) -> None:
    # learning rate 0: the metric never improves, so training stops after `patience` evaluations
    text = _recipe(tmp_path, tiny_assets, max_steps=30, training="  save_steps: 1\n  save_total_limit: 2\n"
                   "  early_stopping_patience: 2\n").replace("learning_rate: 2.0e-3", "learning_rate: 1.0e-12")
    text = text.replace("eval_steps: 3", "eval_steps: 2")
    summary = run_distill(parse_recipe(text), progress=False)
    assert summary["stopped_early"] and summary["steps"] == 6 and summary["best_step"] == 2
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["best-step-000002.safetensors", "step-000005", "step-000006"]


def test_sft_on_instruction_data_with_token_level_kd(tmp_path, tiny_assets, capsys) -> None:
    from kdistill.cli import main

    rows = [{"instruction": f"the movie was {w}", "input": "" if i % 2 else "it was fun",
             "output": f"the film was {w} and the story was {v}"}
            for i, (w, v) in enumerate(zip(["good", "bad", "great", "awful", "dull", "fun"] * 8,
                                           ["fine", "poor", "fun", "dull", "bad", "great"] * 8))]
    data = tmp_path / "instructions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = _recipe(tmp_path, tiny_assets, "causal", objective="  - {kind: ce}\n  - {kind: forward_kl, weight: 0.5}\n",
                   max_steps=12, training="  logging_steps: 1\n")
    text = text.replace(str(tiny_assets["train"]), str(data)).replace(
        f"  validation: {{source: {tiny_assets['dev']}}}\n", "  validation_fraction: 0.25\n").replace(
        "max_length: 16", "max_length: 64\n  format: instruction")
    path = tmp_path / "sft.yaml"
    path.write_text(text)
    assert main(["sft", str(path), "--no-progress"]) == 0, capsys.readouterr().err
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ce = [r["ce"] for r in records if "ce" in r]
    assert ce[-1] < ce[0]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student").config.n_layer == 2
    # a recipe that is not instruction data is refused by `sft`
    path.write_text(_recipe(tmp_path, tiny_assets, "causal", name="plain"))
    assert main(["sft", str(path), "--no-progress"]) == 2
    assert "kdistill sft needs task: causal and data.format: instruction" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["mlm", "causal"])
def test_gradient_checkpointing_trains_the_same_student(tmp_path, tiny_assets, task, monkeypatch) -> None:
    """``training.gradient_checkpointing`` recomputes activations in backward (each layer runs
    twice per step): same losses and weights as without it, also with hooked (MiniLM Q) outputs
    and hidden states in the loss."""
    calls = []
    enable = trainer_module.enable_gradient_checkpointing

    def counting_enable(model):
        enable(model)
        layer = next(m for n, m in model.named_modules()  # a weight-holding leaf of the second layer
                     if ".1." in n and not list(m.children()) and list(m.parameters(recurse=False)))
        layer.register_forward_hook(lambda module, *_: calls.append(1) if module.training else None)

    monkeypatch.setattr(trainer_module, "enable_gradient_checkpointing", counting_enable)
    objective = {"mlm": "  - {kind: soft_ce, temperature: 2.0}\n  - {kind: ce}\n  - {kind: hidden_cosine, layers: [[-1, -1]]}\n"
                        "  - {kind: attention_relation_kl, num_relation_heads: 2, modules: "
                        "[[bert.encoder.layer.1.attention.self.query, bert.encoder.layer.3.attention.self.query]]}\n",
                 "causal": "  - {kind: forward_kl}\n  - {kind: ce}\n  - {kind: hidden_mse, layers: [[1, 2]]}\n"}[task]
    runs = {}
    for name, flag in (("plain", "false"), ("checkpointed", "true")):
        recipe = _recipe(tmp_path, tiny_assets, task, name=name, objective=objective, max_steps=4,
                         training=f"  gradient_checkpointing: {flag}\n  logging_steps: 1\n")
        run_distill(parse_recipe(recipe), progress=False)
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["loss"] for r in records if "loss" in r]
    assert len(calls) >= 2 * 4  # a forward and a recomputation per step
    assert len(runs["plain"]) == 4 and runs["plain"] == pytest.approx(runs["checkpointed"], rel=1e-5)
    _assert_same_weights(_weights(tmp_path / "plain"), _weights(tmp_path / "checkpointed"), atol=1e-5)
    exported = AutoModelForMaskedLM if task == "mlm" else AutoModelForCausalLM
    reloaded = exported.from_pretrained(tmp_path / "checkpointed" / "student")
    flag = "is_activation_checkpointing" if hasattr(type(reloaded), "is_activation_checkpointing") else (
        "is_gradient_checkpointing")
    assert getattr(reloaded, flag) is False


def test_lean_activations_train_the_same_student_as_eager_modules(tmp_path, tiny_assets, monkeypatch) -> None:
    """``training.lean_activations`` (default on) changes a Gemma student's norms and MLPs for the
    run only: same losses and weights as with the eager modules, original classes afterwards."""
    import shutil

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    teacher_dir = tmp_path / "gemma"
    vocab = AutoTokenizer.from_pretrained(tiny_assets["gpt2"]).vocab_size
    torch.manual_seed(0)
    Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       max_position_embeddings=64, sliding_window=16, pad_token_id=0,
                                       bos_token_id=2, eos_token_id=2)).save_pretrained(teacher_dir)
    for file in tiny_assets["gpt2"].iterdir():
        if "token" in file.name or file.name.endswith((".json", ".txt")) and "config" not in file.name:
            shutil.copy(file, teacher_dir / file.name)
    changed, students = [], []
    enable = trainer_module.enable_lean_activations

    def recording_enable(model):
        students.append(model)
        changed.append(enable(model))
        return changed[-1]

    monkeypatch.setattr(trainer_module, "enable_lean_activations", recording_enable)
    assets = {**tiny_assets, "gpt2": teacher_dir}
    runs = {}
    for name, flag in (("eager", "false"), ("lean", "true")):
        recipe = _recipe(tmp_path, assets, "causal", name=name, max_steps=4,
                         objective="  - {kind: forward_kl}\n  - {kind: ce}\n  - {kind: hidden_mse, layers: [[1, 2]]}\n",
                         training=f"  lean_activations: {flag}\n  logging_steps: 1\n")
        run_distill(parse_recipe(recipe), progress=False)
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["loss"] for r in records if "loss" in r]
    assert changed == [2 * (6 + 1) + 1]  # lean run only: 2 layers × (6 norms + MLP) + final norm
    assert not any(type(m).__name__.startswith("Lean") for m in students[0].modules())
    assert len(runs["eager"]) == 4 and runs["eager"] == pytest.approx(runs["lean"], rel=1e-5)
    _assert_same_weights(_weights(tmp_path / "eager"), _weights(tmp_path / "lean"), atol=1e-5)


def test_trim_heap_trains_the_same_student_and_removes_its_hooks(tmp_path, tiny_assets, monkeypatch) -> None:
    """``training.trim_heap`` only gives memory back: bit-identical losses and weights, trims at every
    step's start, the bodies' ends and each student layer's backward, and no hooks left afterwards."""
    made = []

    class RecordingTrims(trainer_module.HeapTrims):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(trainer_module, "HeapTrims", RecordingTrims)
    runs = {}
    for name, flag in (("plain", "false"), ("trimmed", "true")):
        recipe = _recipe(tmp_path, tiny_assets, "causal", name=name, max_steps=3,
                         training=f"  trim_heap: {flag}\n  logging_steps: 1\n")
        run_distill(parse_recipe(recipe), progress=False)
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["loss"] for r in records if "loss" in r]
    (trims,) = made  # the trimmed run only
    assert trims.count >= 3 * (1 + 1 + 1 + 2)  # per step: its start, student and teacher bodies, 2 layers
    assert trims._handles == []
    assert len(runs["plain"]) == 3 and runs["plain"] == runs["trimmed"]
    plain, trimmed = _weights(tmp_path / "plain"), _weights(tmp_path / "trimmed")
    assert plain.keys() == trimmed.keys() and all(torch.equal(plain[k], trimmed[k]) for k in plain)


def test_compile_trains_the_same_student_and_leaves_an_eager_model(tmp_path, tiny_assets, monkeypatch) -> None:
    """``training.compile`` runs the student's and the live teacher's bodies through torch.compile
    (fused kernels): the same losses and weights as eager up to float reassociation, evaluation
    eager, and the models uncompiled afterwards."""
    from torch._dynamo.utils import counters

    compiled = []
    compile_forward = trainer_module.compile_forward

    def recording_compile(model, task):
        compiled.append(compile_forward(model, task))
        return compiled[-1]

    monkeypatch.setattr(trainer_module, "compile_forward", recording_compile)
    runs = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        torch._dynamo.reset()
        counters.clear()
        recipe = _recipe(tmp_path, tiny_assets, "causal", name=name, max_steps=3,
                         training=f"  compile: {flag}\n  logging_steps: 1\n")
        run_distill(parse_recipe(recipe), progress=False)
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["loss"] for r in records if "loss" in r]
        graphs = counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (flag == "true"), graphs
    student_body, teacher_body = compiled  # the compiled run only: the causal LMs' bodies
    assert student_body is not teacher_body
    assert all(body._compiled_call_impl is None for body in compiled)
    assert len(runs["eager"]) == 3 and runs["eager"] == pytest.approx(runs["compiled"], rel=1e-4)
    eager, fused = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    assert eager.keys() == fused.keys()
    diffs = torch.cat([(eager[k] - fused[k]).abs().flatten() for k in eager])
    # Adam turns a near-zero gradient's rounding into up to lr of update (measured: max 5.6e-4,
    # mean 2.8e-7, 37 of 34,656 weights off by more than 1e-4)
    assert diffs.max() <= 2.0e-3 and diffs.mean() <= 1e-5
    AutoModelForCausalLM.from_pretrained(tmp_path / "compiled" / "student")


def test_fused_adamw_only_for_floating_parameters_on_one_cpu_or_cuda_device() -> None:
    assert trainer_module.fused_adamw_supported([torch.nn.Parameter(torch.zeros(2)), torch.zeros(3, 2)])
    assert not trainer_module.fused_adamw_supported([])
    assert not trainer_module.fused_adamw_supported([torch.zeros(2), torch.zeros(2, dtype=torch.int64)])
    assert not trainer_module.fused_adamw_supported([torch.zeros(2, device="meta")])
