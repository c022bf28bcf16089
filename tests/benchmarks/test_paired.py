"""benchmarks/paired.py (heap_trim_cost.py, compile_gain.py): the paired step-time difference of alternating steps."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from paired import paired_difference  # noqa: E402


def test_paired_difference_pairs_adjacent_steps_whichever_comes_first():
    seconds = [1.0, 1.3, 1.5, 1.1, 2.0, 2.4]
    trimmed = [False, True, True, False, False, True]
    got = paired_difference(seconds, trimmed)
    assert got["pairs"] == 3
    assert got["diffs"] == pytest.approx([0.3, 0.4, 0.4])
    assert got["mean"] == pytest.approx(1.1 / 3)
    assert got["median"] == pytest.approx(0.4)
    assert got["stderr"] == pytest.approx(0.1 / 3)  # stdev(0.3, 0.4, 0.4) = 0.1/√3, ÷ √3 pairs
    assert got["median_on"] == pytest.approx(1.5)
    assert got["median_off"] == pytest.approx(1.1)


def test_paired_difference_drops_an_unpaired_last_step():
    got = paired_difference([1.0, 1.2, 1.0, 1.3, 9.0], [False, True, False, True, False])
    assert got["pairs"] == 2 and got["diffs"] == pytest.approx([0.2, 0.3])


@pytest.mark.parametrize("seconds, trimmed, message", [
    ([1.0, 1.1, 1.2, 1.3], [True, True, False, True], "steps 0 and 1 are both on"),
    ([1.0, 1.1, 1.2], [True, False], "3 step times for 2 on/off flags"),
    ([1.0, 1.1], [True, False], "at least two pairs"),
])
def test_paired_difference_refuses_steps_that_do_not_alternate(seconds, trimmed, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(seconds, trimmed)


@pytest.mark.parametrize("module_name, expected", [
    ("heap_trim_cost", {"trim_heap": True, "compile": False, "bf16": False}),
    ("compile_gain", {"trim_heap": False, "compile": True, "bf16": True}),
    ("cache_overhead", {"trim_heap": False, "compile": True, "bf16": True}),
])
def test_each_paired_benchmark_makes_a_valid_llm_kd_recipe(tmp_path, module_name, expected):
    """Their settings must cover every option ``llm_kd._recipe_text`` reads (``--bf16`` once broke heap_trim_cost)."""
    import argparse
    import importlib

    import llm_kd
    from paired import add_run_arguments

    from kdistill.recipe import parse_recipe

    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser()
    add_run_arguments(parser, module.CASES, steps=10, out=str(tmp_path))
    args = parser.parse_args([])
    args.fp32 = args.eager = False  # compile_gain's and cache_overhead's own options
    for case in module.CASES:
        text = llm_kd._recipe_text(case, "trimmed", tmp_path, tmp_path / "train.jsonl", tmp_path / "held.jsonl",
                                   module._case_args(args))
        training = parse_recipe(text).training
        assert {k: getattr(training, k) for k in expected} == expected


def test_cache_overhead_switch_drops_the_kd_term_and_the_teacher_at_off_steps(tiny_causal_job, monkeypatch):
    """Off steps train on the recipe's ``ce`` term alone (the SFT objective) without calling the
    teacher; on steps on the whole objective (the distiller's own terms are back after each off step)."""
    import json

    from cache_overhead import kd_switch
    from paired import train_alternating
    from torch.optim.optimizer import _global_optimizer_post_hooks

    import kdistill.distill.distiller as distiller_module
    from kdistill.signals.live import LiveTeachers

    def torch_hooks():
        return list(_global_optimizer_post_hooks)

    teacher_calls = []
    forward = LiveTeachers.__call__
    monkeypatch.setattr(LiveTeachers, "__call__", lambda self, *a, **k: teacher_calls.append(1) or forward(self, *a, **k))
    # kd_switch patches the class: monkeypatch puts the original back after the test
    monkeypatch.setattr(distiller_module.Distiller, "__call__", distiller_module.Distiller.__call__)
    recipe, job = tiny_causal_job(4)

    class Queue:
        def put(self, item):
            self.item = item

    queue, hooks = Queue(), torch_hooks()
    train_alternating(job, recipe.run_dir, True, switch=kd_switch(), queue=queue)
    assert queue.item["on"] == [True, False, True, False]
    records = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [("forward_kl" in r, "ce" in r) for r in records if "loss" in r] == [(True, True), (False, True)] * 2
    assert len(teacher_calls) == 2
    assert torch_hooks() == hooks  # train_alternating removed its step hook
    for r in records:
        if "loss" in r and "forward_kl" not in r:
            assert r["loss"] == r["ce"]  # the CE term alone, at weight 1
