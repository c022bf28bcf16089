"""Heads read from real (tiny, random) HF models honour soft-capping and scaling."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel

from kdistill.errors import ModelError
from kdistill.losses import HiddenTargets, chunked_distribution_loss, distribution_loss
from kdistill.models.heads import final_hidden_states, lm_head_of


def _gemma(seed: int, layers: int) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0,
        sliding_window=8,
    )
    return Gemma3ForCausalLM(config).eval()


def test_gemma_softcap_chunked_loss_equals_loss_on_model_logits() -> None:
    student, teacher = _gemma(0, 1), _gemma(1, 2)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0
    head = lm_head_of(student)
    assert head.softcap == 5.0
    hidden = final_hidden_states(student, input_ids=ids, attention_mask=attention)
    with torch.no_grad():
        t_hidden = final_hidden_states(teacher, input_ids=ids, attention_mask=attention)
        t_logits = teacher(input_ids=ids, attention_mask=attention).logits
    mask = attention.bool()
    chunked = chunked_distribution_loss(hidden, head, HiddenTargets(t_hidden, lm_head_of(teacher)), mask,
                                        kind="reverse_kl", chunk_size=5)
    dense = distribution_loss(student(input_ids=ids, attention_mask=attention).logits, t_logits, mask,
                              kind="reverse_kl")
    assert chunked.item() == pytest.approx(dense.item(), rel=1e-5)
    chunked.backward()
    assert student.lm_head.weight.grad is not None and torch.isfinite(student.lm_head.weight.grad).all()


def test_gpt2_head_has_no_transform_and_non_lm_model_is_refused() -> None:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    head = lm_head_of(model)
    assert head.softcap is None and head.scale == 1.0 and head.vocab == 64
    with pytest.raises(ModelError, match="output head"):
        lm_head_of(model.transformer)
