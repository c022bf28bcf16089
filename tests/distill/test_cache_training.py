"""Causal-LM KD from a teacher-signal cache, with a vocabulary-trimmed student."""

from __future__ import annotations

import json

import pytest
import torch
from test_engine import _recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdistill.cli import main
from kdistill.distill.pipeline import run_cache, run_distill
from kdistill.errors import ConfigError, DataError
from kdistill.recipe import parse_recipe


def _cached_recipe(tmp_path, assets, name="cached", k=8, extra_student="", training="") -> str:
    text = _recipe(tmp_path, assets, "causal", name=name, objective="  - {kind: forward_kl}\n  - {kind: ce, weight: 0.1}\n",
                   student="  init_from_teacher: {strategy: first, num_layers: 2" + extra_student + "}\n",
                   max_steps=10, training="  logging_steps: 1\n" + training)
    return text + f"signal: {{source: cache, k: {k}, shard_size: 32}}\n"


def test_cache_then_distill_a_trimmed_student(tmp_path, tiny_assets, capsys) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(_cached_recipe(tmp_path, tiny_assets, extra_student=", vocab: {keep: corpus}"))
    assert main(["cache", str(path)]) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "cached" / "cache" / "manifest.json").read_text())
    assert manifest["k"] == 8 and manifest["n_examples"] == 96 and len(manifest["shards"]) == 3
    assert main(["distill", str(path), "--no-progress"]) == 0, capsys.readouterr().err
    student_dir = tmp_path / "cached" / "student"
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher_tok = AutoTokenizer.from_pretrained(tiny_assets["gpt2"])
    vocab = json.loads((student_dir / "kdistill_vocab.json").read_text())
    assert len(tokenizer) < len(teacher_tok) and model.config.vocab_size == len(vocab["new_to_old"])
    text = json.loads(tiny_assets["train"].read_text().splitlines()[0])["text"]  # a training sentence
    mapped = [vocab["new_to_old"][i] for i in tokenizer(text)["input_ids"]]
    assert mapped == teacher_tok(text)["input_ids"]  # same tokenization, in the teacher's ids
    records = [json.loads(x) for x in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["forward_kl"] for r in records if "forward_kl" in r]
    assert kl[-1] < kl[0]


def test_cache_with_k_equal_v_trains_like_the_live_teacher(tmp_path, tiny_assets) -> None:
    """A top-V cache holds the whole distribution: the first step's loss matches the live teacher's."""
    vocab = len(AutoTokenizer.from_pretrained(tiny_assets["gpt2"]))
    cached = parse_recipe(_cached_recipe(tmp_path, tiny_assets, k=vocab))
    run_cache(cached)
    run_distill(cached, progress=False)
    live = parse_recipe(_cached_recipe(tmp_path, tiny_assets, name="live").replace(
        "signal: {source: cache, k: 8, shard_size: 32}\n", ""))
    run_distill(live, progress=False)
    first = [json.loads(open(tmp_path / n / "metrics.jsonl").readline()) for n in ("cached", "live")]
    assert first[0]["forward_kl"] == pytest.approx(first[1]["forward_kl"], rel=1e-3)  # measured: 4e-5 apart
    assert first[0]["ce"] == pytest.approx(first[1]["ce"], rel=1e-5)


def test_cache_from_another_teacher_or_corrupt_shard_is_refused(tmp_path, tiny_assets) -> None:
    recipe = parse_recipe(_cached_recipe(tmp_path, tiny_assets))
    run_cache(recipe)
    other = tmp_path / "other-teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["gpt2"])
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_assets["gpt2"]).save_pretrained(other)
    moved = parse_recipe(_cached_recipe(tmp_path, tiny_assets).replace(f"teacher: {tiny_assets['gpt2']}",
                                                                        f"teacher: {other}"))
    with pytest.raises(ConfigError, match="teacher_sha256"):
        run_distill(moved, progress=False)
    shard = tmp_path / "cached" / "cache" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard-00001"):
        run_distill(recipe, progress=False)


def test_trimmed_vocabulary_that_cannot_encode_an_example(tmp_path, tiny_assets) -> None:
    recipe = parse_recipe(_cached_recipe(tmp_path, tiny_assets, extra_student=", vocab: {keep: corpus, max_size: 12}")
                          .replace("signal: {source: cache, k: 8, shard_size: 32}\n", ""))
    with pytest.raises(DataError, match="cannot encode training example"):
        run_distill(recipe, progress=False)


def test_live_teacher_of_a_trimmed_student_is_trimmed_to_the_kept_tokens(tmp_path, tiny_assets) -> None:
    """Live KD into a trimmed student: the teacher reads the student's ids and its distribution is
    the full teacher's renormalised over the kept tokens (first-step loss vs a direct reference)."""
    import torch.nn.functional as F

    from kdistill.distill.distiller import Distiller, StepCounts, StudentModule, batch_counts
    from kdistill.distill.pipeline import build_job

    text = _cached_recipe(tmp_path, tiny_assets, name="live-trim", extra_student=", vocab: {keep: corpus}").replace(
        "signal: {source: cache, k: 8, shard_size: 32}\n", "")
    job, _, sizes, extras = build_job(parse_recipe(text))
    plan = extras["vocab_plan"]
    (teacher,) = job.teachers.models
    assert teacher.get_input_embeddings().num_embeddings == plan.new_size == job.student.config.vocab_size
    full = AutoModelForCausalLM.from_pretrained(tiny_assets["gpt2"]).eval()
    assert sizes["teacher"]["total"] == sum(p.numel() for p in full.parameters())  # counted before trimming

    batch = job.collator(job.train_examples[:4])
    counts = StepCounts(**{k: float(v) for k, v in batch_counts(batch, "causal").items()})
    distiller = Distiller(StudentModule(job.student, "causal"), job.teachers, job.terms[:1], "causal")
    loss, _ = distiller(batch, counts)

    with torch.no_grad():
        n2o = plan.new_to_old
        inputs = {"input_ids": n2o[batch["input_ids"]], "attention_mask": batch["attention_mask"]}
        t_logp = full(**inputs).logits[:, :-1, n2o].log_softmax(-1)  # full teacher, restricted, renormalised
        s_logp = job.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        s_logp = s_logp.log_softmax(-1)
        mask = batch["labels"][:, 1:] != -100
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)[mask].sum() / counts.labels
    assert float(loss.detach()) == pytest.approx(float(kl), rel=1e-5)
    assert float(F.mse_loss(t_logp, s_logp)) > 0  # a real comparison, not two copies of one model


def test_build_job_loads_each_tokenizer_once(tmp_path, tiny_assets, monkeypatch) -> None:
    """The student's tokenizer, the vocabulary check's and the cache manifest's are one load of
    the teacher's (a Gemma 3 tokenizer costs ~0.3 GiB to load); a cache still opens, the trimmed
    student still gets the trimmed tokenizer, and the untrimmed one is freed before the cache's
    manifest check reads every teacher weight."""
    import weakref

    import kdistill.distill.pipeline as pipeline
    import kdistill.signals.cache as cache_module

    loaded, alive_at_hashing = [], []
    load, hash_model = pipeline.load_tokenizer, cache_module.hash_model

    def counted(ref, **kwargs):
        tokenizer = load(ref, **kwargs)
        loaded.append((ref, weakref.ref(tokenizer)))
        return tokenizer

    def hashing(model):  # the teacher's weights are read: the untrimmed tokenizer is gone by then
        alive_at_hashing.extend(tokenizer() is not None for _, tokenizer in loaded)
        return hash_model(model)

    cached = parse_recipe(_cached_recipe(tmp_path, tiny_assets, extra_student=", vocab: {keep: corpus}"))
    run_cache(cached)
    monkeypatch.setattr(pipeline, "load_tokenizer", counted)
    monkeypatch.setattr(cache_module, "hash_model", hashing)
    live = parse_recipe(_cached_recipe(tmp_path, tiny_assets, name="live-once", extra_student=", vocab: {keep: corpus}")
                        .replace("signal: {source: cache, k: 8, shard_size: 32}\n", ""))
    full = len(AutoTokenizer.from_pretrained(tiny_assets["gpt2"]))
    for recipe in (cached, live):
        loaded.clear()
        job, tokenizer, _, extras = pipeline.build_job(recipe)
        assert [ref for ref, _ in loaded] == [str(tiny_assets["gpt2"])]
        assert len(tokenizer) == extras["vocab_plan"].new_size < full
        assert job.collator.tokenizer is tokenizer
    assert alive_at_hashing == [False]  # the cache recipe's one load


def test_bf16_teacher_live_and_cached(tmp_path, tiny_assets) -> None:
    """``teacher: {dtype: bfloat16}``: the live teacher's body runs in bf16 (the student stays
    fp32) and its first-step loss is close to the fp32 teacher's; a cache written by the bf16
    teacher trains, and refuses the fp32 teacher's recipe by its teacher hash."""
    from kdistill.distill.distiller import Distiller, StepCounts, StudentModule, batch_counts
    from kdistill.distill.pipeline import build_job

    gpt2 = str(tiny_assets["gpt2"])

    def bf16(text: str) -> str:
        return text.replace(f"teacher: {gpt2}", f"teacher: {{model: {gpt2}, dtype: bfloat16}}")

    live = _cached_recipe(tmp_path, tiny_assets, name="live-bf16").replace(
        "signal: {source: cache, k: 8, shard_size: 32}\n", "")
    losses = {}
    for name, text in {"fp32": live, "bf16": bf16(live)}.items():
        job, *_ = build_job(parse_recipe(text))
        (teacher,) = job.teachers.models
        body = {p.dtype for n, p in teacher.named_parameters() if ".h.0.mlp" in n}
        assert body == {torch.float32 if name == "fp32" else torch.bfloat16}
        assert {p.dtype for p in job.student.parameters()} == {torch.float32}
        batch = job.collator(job.train_examples[:4])
        counts = StepCounts(**{k: float(v) for k, v in batch_counts(batch, "causal").items()})
        torch.manual_seed(0)
        loss, _ = Distiller(StudentModule(job.student, "causal"), job.teachers, job.terms[:1], "causal")(batch, counts)
        losses[name] = float(loss.detach())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2) and losses["bf16"] != losses["fp32"]

    cached = parse_recipe(bf16(_cached_recipe(tmp_path, tiny_assets, name="cached-bf16")))
    run_cache(cached)
    run_distill(cached, progress=False)
    records = [json.loads(x) for x in (tmp_path / "cached-bf16" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["forward_kl"] for r in records if "forward_kl" in r]
    assert kl[-1] < kl[0]
    fp32 = parse_recipe(_cached_recipe(tmp_path, tiny_assets, name="cached-bf16"))
    with pytest.raises(ConfigError, match="teacher_sha256"):
        build_job(fp32)
