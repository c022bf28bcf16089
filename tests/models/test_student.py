"""Students built from tiny random teachers: kept weights, untouched teacher, clean reload, KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from kdistill.errors import ConfigError, ModelError
from kdistill.models.layers import find_layer_stack
from kdistill.models.student import count_parameters, student_from_teacher

_BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=37)
_DECODER = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16)


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


def _bert_cls() -> BertForSequenceClassification:
    return _seeded(lambda: BertForSequenceClassification(BertConfig(**_BERT, num_labels=3)))


def _bert_mlm() -> BertForMaskedLM:
    return _seeded(lambda: BertForMaskedLM(BertConfig(**_BERT)))


def _distilbert() -> DistilBertForSequenceClassification:
    config = DistilBertConfig(vocab_size=99, dim=32, n_layers=6, n_heads=4, hidden_dim=37)
    return _seeded(lambda: DistilBertForSequenceClassification(config))


def _gpt2(**kwargs) -> GPT2LMHeadModel:
    return _seeded(lambda: GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=99, **kwargs)))


def _llama() -> LlamaForCausalLM:
    return _seeded(lambda: LlamaForCausalLM(LlamaConfig(**_DECODER, num_hidden_layers=4)))


def _gemma3() -> Gemma3ForCausalLM:
    # sliding_window_pattern=3: layers 2 and 5 are full attention, the rest sliding (window 4)
    config = Gemma3TextConfig(**_DECODER, num_hidden_layers=6, sliding_window=4, sliding_window_pattern=3,
                              final_logit_softcapping=5.0)
    return _seeded(lambda: Gemma3ForCausalLM(config))


def _qwen2() -> Qwen2ForCausalLM:
    config = Qwen2Config(**_DECODER, num_hidden_layers=4, use_sliding_window=True, sliding_window=4,
                         max_window_layers=2)
    return _seeded(lambda: Qwen2ForCausalLM(config))


def _ids(vocab: int, length: int = 9) -> torch.Tensor:
    return torch.randint(1, vocab, (2, length), generator=torch.Generator().manual_seed(1))


def _snapshot(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CASES = [
    (_bert_cls, [0, 2, 5]),
    (_bert_mlm, [1, 4]),
    (_distilbert, [0, 2, 4]),
    (_gpt2, [1, 3]),
    (_llama, [0, 3]),
    (_gemma3, [0, 2, 4]),
    (_qwen2, [1, 2]),
]


@pytest.mark.parametrize(("build", "kept"), CASES)
def test_student_keeps_the_chosen_layers_and_leaves_the_teacher_alone(build, kept: list[int]) -> None:
    teacher = build()
    before = _snapshot(teacher)
    teacher_count = teacher.config.num_hidden_layers
    path, teacher_stack = find_layer_stack(teacher)

    student = student_from_teacher(teacher, kept)

    student_path, student_stack = find_layer_stack(student)
    assert student_path == path
    assert len(student_stack) == len(kept) == student.config.num_hidden_layers
    for new, old in enumerate(kept):
        s_params = dict(student_stack[new].named_parameters())
        t_params = dict(teacher_stack[old].named_parameters())
        assert s_params.keys() == t_params.keys()
        for name, param in s_params.items():
            assert torch.equal(param, t_params[name]), name
            assert param.data_ptr() != t_params[name].data_ptr()  # copied, not shared
    # everything outside the stack (embeddings, final norm, head) is copied as it is
    prefix = path + "."
    outside = {k: v for k, v in student.state_dict().items() if not k.startswith(prefix)}
    assert outside and all(torch.equal(v, before[k]) for k, v in outside.items())

    # the teacher is unchanged: weights, layer count, config
    assert teacher.config.num_hidden_layers == teacher_count and len(teacher_stack) == teacher_count
    after = teacher.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize(("build", "kept"), CASES)
def test_student_save_and_reload_gives_identical_outputs(build, kept: list[int], tmp_path) -> None:
    student = student_from_teacher(build(), kept)
    ids = _ids(student.config.vocab_size)
    student.save_pretrained(tmp_path)
    reloaded = type(student).from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == len(kept)
    assert getattr(reloaded.config, "layer_types", None) == getattr(student.config, "layer_types", None)
    with torch.no_grad():
        expected = student(input_ids=ids).logits
        actual = reloaded(input_ids=ids).logits
    assert torch.equal(actual, expected)


def test_gemma3_layer_types_follow_the_kept_layers() -> None:
    teacher = _gemma3()
    types = list(teacher.config.layer_types)
    assert types == ["sliding_attention", "sliding_attention", "full_attention"] * 2
    student = student_from_teacher(teacher, [1, 2, 4, 5])
    assert student.config.layer_types == [types[i] for i in (1, 2, 4, 5)]
    assert teacher.config.layer_types == types
    _, stack = find_layer_stack(student)
    assert [layer.self_attn.layer_idx for layer in stack] == [0, 1, 2, 3]
    assert [layer.self_attn.is_sliding for layer in stack] == [True, False, True, False]


def test_qwen2_layer_types_follow_the_kept_layers() -> None:
    teacher = _qwen2()
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student = student_from_teacher(teacher, [1, 2])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    ("build", "kept"), [(_gpt2, [1, 3]), (_llama, [1, 3]), (_gemma3, [1, 2, 5]), (_qwen2, [0, 3])]
)
def test_causal_student_kv_cache_works(build, kept: list[int]) -> None:
    student = student_from_teacher(build(), kept)
    _, stack = find_layer_stack(student)
    assert [m.layer_idx for layer in stack for m in layer.modules() if hasattr(m, "layer_idx")][-1] == len(kept) - 1
    ids = _ids(student.config.vocab_size, length=7)  # longer than the sliding window (4)
    with torch.no_grad():
        full = student(input_ids=ids, use_cache=False).logits
        prefix = student(input_ids=ids[:, :5], use_cache=True)
        step = student(input_ids=ids[:, 5:6], past_key_values=prefix.past_key_values, use_cache=True)
        step = student(input_ids=ids[:, 6:7], past_key_values=step.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)

    cached = student.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    uncached = student.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False)
    assert cached.shape == (2, 10)
    assert torch.equal(cached, uncached)


def test_gpt2_inverse_layer_idx_scaling_reloads_identically(tmp_path) -> None:
    student = student_from_teacher(_gpt2(scale_attn_by_inverse_layer_idx=True), [1, 3])
    student.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = _ids(99)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)


def test_tied_embeddings_stay_tied_to_the_students_own_copy() -> None:
    teacher = _bert_mlm()
    student = student_from_teacher(teacher, [0, 5])
    s_in, s_out = student.get_input_embeddings().weight, student.get_output_embeddings().weight
    assert s_in is s_out
    assert s_in is not teacher.get_input_embeddings().weight


def test_student_of_a_frozen_teacher_is_trainable() -> None:
    teacher = _llama().requires_grad_(False)
    assert all(p.requires_grad for p in student_from_teacher(teacher, [0, 1]).parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(p.requires_grad for p in student_from_teacher(teacher, [0], trainable=False).parameters())


@pytest.mark.parametrize(("kept", "message"), [([0, 4], "layer index 4 out of range for a teacher with 4 layers"),
                                               ([2, 1], "strictly increasing"), ([], "must not be empty")])
def test_student_from_teacher_rejects_bad_indices(kept: list[int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        student_from_teacher(_llama(), kept)


def test_student_whose_config_would_rebuild_other_layers_is_a_model_error() -> None:
    # Qwen3-MoE places sparse blocks by position ((i + 1) % decoder_sparse_step == 0): keeping teacher
    # layers 1 and 3 (both sparse) gives a student whose config would rebuild layer 0 as dense.
    config = Qwen3MoeConfig(**_DECODER, moe_intermediate_size=16, num_experts=2, num_experts_per_tok=1,
                            num_hidden_layers=4, decoder_sparse_step=2)
    teacher = _seeded(lambda: Qwen3MoeForCausalLM(config))
    with pytest.raises(ModelError, match="would not reload from its config"):
        student_from_teacher(teacher, [1, 3])
    assert student_from_teacher(teacher, [0, 1]).config.num_hidden_layers == 2


@pytest.mark.parametrize("tied", [True, False])
def test_count_parameters_counts_tied_embeddings_once(tied: bool) -> None:
    model = _gpt2(tie_word_embeddings=tied)
    counts = count_parameters(model)
    wte = 99 * 32
    unique = {id(p): p.numel() for p in model.parameters()}
    assert counts["total"] == sum(unique.values())
    assert counts["embedding"] == (wte if tied else 2 * wte)
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]
    student = count_parameters(student_from_teacher(model, [0, 2]))
    assert student["embedding"] == counts["embedding"]
    assert student["non_embedding"] == counts["non_embedding"] - 2 * sum(
        p.numel() for p in model.transformer.h[1].parameters())


def _plan(old_size: int, kept: list[int]):
    from kdistill.models.vocab import VocabCoverage, VocabPlan

    old_to_new = torch.full((old_size,), -1, dtype=torch.long)
    old_to_new[kept] = torch.arange(len(kept))
    coverage = VocabCoverage(old_size, len(kept), len(kept), len(kept), 0, 0, 0, len(kept), len(kept))
    return VocabPlan(tuple(kept), old_to_new, torch.tensor(kept), coverage)


@pytest.mark.parametrize("build", [_gpt2, _llama, _gemma3, _bert_mlm, _bert_cls])
def test_a_trimmed_student_equals_trimming_the_copy_and_shares_nothing_with_the_teacher(build, monkeypatch) -> None:
    """``vocab_plan`` gives the student that trimming the full copy gives (weights, config, outputs),
    tied or not, with or without a head, without deep-copying a full-vocabulary weight; the teacher
    is unchanged and no student weight is a teacher's."""
    from kdistill.models.vocab import trim_model

    teacher = build()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    plan = _plan(teacher.config.vocab_size, [0, 2, 3, 5, 8, 13, 21, 34, 55, 89])
    copied = []
    deepcopy = torch.nn.Parameter.__deepcopy__

    def recorded(self, memo):
        if id(self) not in memo:
            copied.append(tuple(self.shape))
        return deepcopy(self, memo)

    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", recorded)
    student = student_from_teacher(teacher, [0, 2], vocab_plan=plan)
    assert copied and not [shape for shape in copied if teacher.config.vocab_size in shape]
    monkeypatch.undo()
    reference = trim_model(student_from_teacher(teacher, [0, 2]), plan)

    assert student.config.to_dict() == reference.config.to_dict()
    have, want = student.state_dict(), reference.state_dict()
    assert have.keys() == want.keys() and all(torch.equal(have[k], want[k]) for k in want)
    assert student.get_input_embeddings().num_embeddings == plan.new_size
    assert all(p.requires_grad for p in student.parameters())
    teacher_storage = {t.untyped_storage().data_ptr() for t in teacher.state_dict().values()}
    assert not teacher_storage & {t.untyped_storage().data_ptr() for t in have.values()}
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    ids = torch.tensor([[1, 4, 9, 0]])
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(input_ids=ids).logits, reference.eval()(input_ids=ids).logits,
                                   rtol=0, atol=0)
