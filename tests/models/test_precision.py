"""Teacher inference precision (bf16 body, fp32 head) and weights copied out of the checkpoint map."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from kdistill.errors import ModelError
from kdistill.models.precision import own_memory, set_inference_precision
from kdistill.models.resolve import load_model


def _tiny_gemma() -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              max_position_embeddings=64, sliding_window=16)
    return Gemma3ForCausalLM(config).eval()


def _mapped(name: str) -> int:
    return sum(name in line for line in open("/proc/self/maps"))


def test_bf16_body_keeps_embeddings_head_and_logits_fp32() -> None:
    model = _tiny_gemma()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    assert set_inference_precision(model, "bfloat16") is model
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes["model.layers.1.mlp.down_proj.weight"] == torch.bfloat16
    assert dtypes["model.embed_tokens.weight"] == torch.float32  # also the (tied) head
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert dtypes["model.norm.weight"] == torch.float32
    with torch.no_grad():
        logits = model(ids).logits
        hidden = model.base_model(ids).last_hidden_state
    assert logits.dtype == hidden.dtype == torch.float32
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert 0 < kl < 1e-4  # bf16 GEMMs: close to the fp32 model, not identical
    set_inference_precision(model, "bfloat16")  # idempotent: one autocast wrapper
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits)


def test_float32_or_none_leaves_the_model_alone_and_others_are_refused() -> None:
    model = _tiny_gemma()
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    for precision in (None, "float32"):
        set_inference_precision(model, precision)
    assert before == {n: p.data_ptr() for n, p in model.named_parameters()}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ModelError, match="float16"):
        set_inference_precision(model, "float16")


def test_own_memory_releases_the_checkpoint_map_and_keeps_ties(tmp_path) -> None:
    _tiny_gemma().save_pretrained(tmp_path / "tiny")
    model = load_model(str(tmp_path / "tiny"), "causal")
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(ids).logits
    if not _mapped(str(tmp_path / "tiny")):
        pytest.skip("this transformers version copies weights out of the checkpoint at load")
    own_memory(model)
    gc.collect()
    assert _mapped(str(tmp_path / "tiny")) == 0
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=0)


def test_a_dropped_bf16_model_is_freed_without_garbage_collection() -> None:
    import weakref

    model = set_inference_precision(_tiny_gemma(), "bfloat16")
    alive = weakref.ref(model.model)
    gc.disable()
    try:
        del model
        assert alive() is None
    finally:
        gc.enable()


def test_bf16_survives_a_deep_copy_and_a_failing_forward() -> None:
    import copy

    model = set_inference_precision(_tiny_gemma(), "bfloat16")
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(IndexError):
        model.base_model(torch.full((1, 3), 10_000))  # an id beyond the embedding
    assert not torch.is_autocast_enabled("cpu")  # the failed call closed its autocast context


def test_bf16_classifier_teacher_hands_fp32_to_its_head(tiny_assets) -> None:
    """BERT's pooler runs inside the bf16 body; its output reaches the fp32 classifier as fp32."""
    model = load_model(str(tiny_assets["bert-cls"]), "classification").eval()
    batch = {"input_ids": torch.tensor([[2, 10, 11, 12, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        reference = model(**batch).logits
        set_inference_precision(model, "bfloat16")
        assert model.bert.pooler.dense.weight.dtype == torch.bfloat16
        assert model.classifier.weight.dtype == torch.float32
        out = model(**batch, output_hidden_states=True)
    assert out.logits.dtype == torch.float32 and {h.dtype for h in out.hidden_states} == {torch.float32}
    # the logits of a tiny random model are ~1e-2: compare to their scale (measured: 0.4% of it)
    assert (out.logits - reference).abs().max() <= 0.02 * reference.abs().max()


def test_bf16_teacher_runs_under_torch_compile() -> None:
    """Another trainer may compile the teacher (TRL's ``torch_compile`` compiles every prepared model):
    the bf16 body's autocast is part of its forward, which dynamo traces, not hooks it cannot."""
    model = set_inference_precision(_tiny_gemma(), "bfloat16")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend="aot_eager")(ids).logits
    assert compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-3)
    assert not torch.is_autocast_enabled("cpu")
