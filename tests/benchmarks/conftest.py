"""Shared by the benchmark tests: a tiny causal KD job (GPT-2 teacher from ``tiny_assets``)."""

import pytest


@pytest.fixture
def tiny_causal_job(tmp_path, tiny_assets):
    """``make(max_steps)`` → (recipe, job): a 2-layer student of the tiny GPT-2 teacher, forward KL + CE,
    batch 8, clipping at 1.0, a log record every step."""
    from kdistill.distill.pipeline import build_job
    from kdistill.recipe import parse_recipe

    def make(max_steps: int):
        recipe = parse_recipe(f"""
name: tiny-causal
task: causal
output_dir: {tmp_path / "run"}
teacher: {tiny_assets["gpt2"]}
student:
  init_from_teacher: {{strategy: uniform, num_layers: 2}}
data:
  train: {{source: {tiny_assets["train"]}}}
  max_length: 16
objective: [{{kind: forward_kl}}, {{kind: ce}}]
training: {{per_device_train_batch_size: 8, max_steps: {max_steps}, learning_rate: 1.0e-3, max_grad_norm: 1.0,
           logging_steps: 1}}
""")
        job, _, _, _ = build_job(recipe)
        return recipe, job

    return make
