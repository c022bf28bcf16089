"""kdistill.distill.compiled: what training.compile compiles, eager evaluation, and undoing it."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from kdistill.distill.compiled import compile_forward, eager_forward, uncompile
from kdistill.models.outputs import forward_module


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def test_the_target_is_a_causal_lms_body_and_any_other_model_whole() -> None:
    llama = _tiny_llama()
    assert forward_module(llama, "causal") is llama.model
    bert = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32))
    assert forward_module(bert, "classification") is bert


def test_eager_forward_compiles_nothing_and_uncompile_restores_the_eager_call() -> None:
    model = _tiny_llama().eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.model(input_ids=ids).last_hidden_state
    body = compile_forward(model, "causal")
    assert body is model.model and body._compiled_call_impl is not None
    torch._dynamo.reset()
    counters.clear()
    with eager_forward(True), torch.no_grad():
        inside = model.model(input_ids=ids).last_hidden_state
    assert counters["stats"]["unique_graphs"] == 0  # nothing was traced or compiled
    torch.testing.assert_close(inside, expected, rtol=0, atol=0)
    uncompile(body)
    assert body._compiled_call_impl is None
    with torch.no_grad():
        torch.testing.assert_close(model.model(input_ids=ids).last_hidden_state, expected, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 0
    with eager_forward(False):  # nothing compiled: a no-op
        pass
