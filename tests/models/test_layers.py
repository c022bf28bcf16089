"""Layer stacks found by inspection in tiny random HF models; layer selection strategies."""

from __future__ import annotations

import pytest
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

from kdistill.errors import ConfigError, ModelError
from kdistill.models.layers import find_layer_stack, select_layers

_BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=37)
_DECODER = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16)


@pytest.mark.parametrize(
    ("build", "path", "count"),
    [
        (lambda: BertForSequenceClassification(BertConfig(**_BERT)), "bert.encoder.layer", 6),
        (lambda: BertForMaskedLM(BertConfig(**_BERT)), "bert.encoder.layer", 6),
        (lambda: BertModel(BertConfig(**_BERT)), "encoder.layer", 6),
        (lambda: RobertaForMaskedLM(RobertaConfig(**{**_BERT, "num_hidden_layers": 3})), "roberta.encoder.layer", 3),
        (lambda: DistilBertForSequenceClassification(
            DistilBertConfig(vocab_size=99, dim=32, n_layers=3, n_heads=4, hidden_dim=37)),
         "distilbert.transformer.layer", 3),
        (lambda: GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=99)), "transformer.h", 4),
        (lambda: LlamaForCausalLM(LlamaConfig(**_DECODER, num_hidden_layers=3)), "model.layers", 3),
        (lambda: Qwen2ForCausalLM(Qwen2Config(**_DECODER, num_hidden_layers=2)), "model.layers", 2),
        (lambda: Gemma3ForCausalLM(Gemma3TextConfig(**_DECODER, num_hidden_layers=2, sliding_window=4)),
         "model.layers", 2),
    ],
)
def test_find_layer_stack(build, path: str, count: int) -> None:
    model = build()
    found_path, stack = find_layer_stack(model)
    assert found_path == path
    assert stack is model.get_submodule(path)
    assert isinstance(stack, nn.ModuleList) and len(stack) == count


def test_find_layer_stack_prefers_the_list_holding_the_blocks() -> None:
    model = LlamaForCausalLM(LlamaConfig(**_DECODER, num_hidden_layers=2))
    model.model.extra = nn.ModuleList([nn.LayerNorm(32) for _ in range(2)])  # same length, fewer parameters
    assert find_layer_stack(model)[0] == "model.layers"


def test_find_layer_stack_without_a_matching_list_is_a_model_error() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = BertConfig(**_BERT)
            self.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    with pytest.raises(ModelError, match="layer stack of Tiny"):
        find_layer_stack(Tiny())


@pytest.mark.parametrize(
    ("n", "strategy", "num_layers", "layers", "expected"),
    [
        (12, "every_other", None, None, [0, 2, 4, 6, 8, 10]),
        (5, "every_other", None, None, [0, 2, 4]),
        (1, "every_other", None, None, [0]),
        (12, "every_other", 6, None, [0, 2, 4, 6, 8, 10]),
        (12, "uniform", 6, None, [0, 2, 4, 7, 9, 11]),
        (12, "uniform", 4, None, [0, 4, 7, 11]),
        (12, "uniform", 2, None, [0, 11]),
        (12, "uniform", 1, None, [11]),
        (6, "uniform", 6, None, [0, 1, 2, 3, 4, 5]),
        (12, "first", 3, None, [0, 1, 2]),
        (12, "explicit", None, [0, 2, 4, 7, 9, 11], [0, 2, 4, 7, 9, 11]),
        (12, "explicit", 2, [3, 5], [3, 5]),
    ],
)
def test_select_layers(n, strategy, num_layers, layers, expected) -> None:
    assert select_layers(n, strategy, num_layers=num_layers, layers=layers) == expected


@pytest.mark.parametrize(
    ("n", "strategy", "num_layers", "layers", "message"),
    [
        (12, "explicit", None, [0, 12], "layer index 12 out of range for a teacher with 12 layers"),
        (12, "explicit", None, [-1, 3], "layer index -1 out of range"),
        (12, "explicit", None, [3, 3], "strictly increasing"),
        (12, "explicit", None, [4, 2], "strictly increasing"),
        (12, "explicit", None, [], "must not be empty"),
        (12, "explicit", None, None, "needs layers"),
        (12, "explicit", 3, [1, 2], "disagrees"),
        (12, "uniform", None, None, "needs num_layers"),
        (12, "first", None, None, "needs num_layers"),
        (12, "uniform", 13, None, "num_layers 13 exceeds the teacher's 12 layers"),
        (12, "first", 0, None, "positive integer"),
        (12, "every_other", 3, None, "disagrees"),
        (12, "first", 2, [0, 1], "only to strategy 'explicit'"),
        (12, "middle", 2, None, "not one of"),
        (0, "first", 1, None, "at least one layer"),
    ],
)
def test_select_layers_errors(n, strategy, num_layers, layers, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        select_layers(n, strategy, num_layers=num_layers, layers=layers)


def test_select_layers_uniform_is_strictly_increasing_and_spans_the_depth() -> None:
    for n in range(1, 30):
        for count in range(1, n + 1):
            chosen = select_layers(n, "uniform", num_layers=count)
            assert len(chosen) == count and chosen[-1] == n - 1
            assert all(b > a for a, b in zip(chosen, chosen[1:]))
            if count > 1:
                assert chosen[0] == 0

