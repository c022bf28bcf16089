"""benchmarks/llm_kd.py: the cases' recipes, and TRL's two trainers on the same student."""

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import llm_kd  # noqa: E402


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    llm_kd.add_data_arguments(parser)
    llm_kd.add_recipe_arguments(parser)
    args = parser.parse_args([])
    args.steps = 2
    return argparse.Namespace(**{**vars(args), **overrides})


def test_trl_sft_trains_the_sft_recipe(tmp_path):
    """TRL's SFT case builds the same student from the same recipe as kdistill's SFT: CE only."""
    from kdistill.recipe import parse_recipe

    def recipe(case):
        return parse_recipe(llm_kd._recipe_text(case, "trimmed", tmp_path, tmp_path / "t.jsonl", tmp_path / "h.jsonl",
                                                _args()))

    sft, trl_sft, live = recipe("sft"), recipe("trl_sft"), recipe("kdistill_live")
    assert [t.kind for t in trl_sft.objective] == [t.kind for t in sft.objective] == ["ce"]
    assert [t.kind for t in live.objective] == ["forward_kl", "ce"]
    assert trl_sft.student == sft.student and trl_sft.training == sft.training


@pytest.mark.parametrize("case", llm_kd.TRL_CASES)
def test_trl_trainers_train_the_student(case, tiny_causal_job, tiny_assets, tmp_path):
    pytest.importorskip("trl")
    _, job = tiny_causal_job(2)
    before = [p.detach().clone() for p in job.student.parameters()]
    times = llm_kd._train_trl(case, job, _args(batch=8, max_length=16), tmp_path, steps=3,
                              tokenizer=str(tiny_assets["gpt2"]))
    assert len(times) == 2 and all(t > 0 for t in times)  # the first step is left out
    assert any(not torch.equal(a, b) for a, b in zip(before, job.student.parameters()))
