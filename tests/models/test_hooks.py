"""Forward-hook capture of submodule outputs (MiniLM Q/K/V from SDPA models)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from kdistill.errors import ModelError
from kdistill.losses.relation import attention_relation_kl
from kdistill.models.hooks import capture_outputs

QKV = [f"encoder.layer.1.attention.self.{name}" for name in ("query", "key", "value")]


@pytest.fixture(scope="module")
def bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        attn_implementation="sdpa",
    )
    model = BertModel(config).eval()
    assert model.config._attn_implementation == "sdpa"
    return model


def batch():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 99, (2, 7), generator=g)
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 4:] = 0
    return input_ids, attention_mask


def test_capture_qkv_shapes_and_relation_loss_is_differentiable(bert):
    input_ids, attention_mask = batch()
    with capture_outputs(bert, QKV) as out:
        bert(input_ids=input_ids, attention_mask=attention_mask)
    assert set(out) == set(QKV)
    for path in QKV:
        assert out[path].shape == (2, 7, 32)
        assert out[path].requires_grad
    # the captured query equals the projection applied to the layer's input
    with capture_outputs(bert, ["encoder.layer.0"]) as layer_in:
        hidden = bert(input_ids=input_ids, attention_mask=attention_mask)
    query = bert.get_submodule(QKV[0])
    torch.testing.assert_close(out[QKV[0]], query(layer_in["encoder.layer.0"]))
    assert hidden is not None

    mask = attention_mask.bool()
    teacher = out[QKV[1]].detach() * 2.0
    loss = attention_relation_kl(out[QKV[0]], teacher, mask, num_relation_heads=4)
    assert torch.isfinite(loss) and loss.item() > 0
    bert.zero_grad()
    loss.backward()
    grad = query.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    bert.zero_grad()


def test_hooks_removed_on_exit_and_on_exception(bert):
    modules = [bert.get_submodule(p) for p in QKV]
    with capture_outputs(bert, QKV):
        assert all(len(m._forward_hooks) == 1 for m in modules)
    assert all(len(m._forward_hooks) == 0 for m in modules)

    with pytest.raises(RuntimeError, match="boom"):
        with capture_outputs(bert, QKV):
            raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in modules)

    # nothing is recorded by forwards outside the block
    input_ids, attention_mask = batch()
    with capture_outputs(bert, QKV[:1]) as out:
        pass
    with torch.no_grad():
        bert(input_ids=input_ids, attention_mask=attention_mask)
    assert out == {}


def test_tuple_and_model_outputs_keep_first_element(bert):
    input_ids, attention_mask = batch()
    paths = ["encoder.layer.1.attention", "encoder.layer.1.attention", "encoder.layer.1.attention.output", "encoder"]
    with torch.no_grad(), capture_outputs(bert, paths) as out:
        result = bert(input_ids=input_ids, attention_mask=attention_mask)
    assert set(out) == {"encoder.layer.1.attention", "encoder.layer.1.attention.output", "encoder"}
    assert all(isinstance(v, torch.Tensor) for v in out.values())
    # BertAttention returns (attention_output, attention_weights); its first element is BertSelfOutput's
    torch.testing.assert_close(out["encoder.layer.1.attention"], out["encoder.layer.1.attention.output"])
    # the encoder returns a ModelOutput (dict-like): its first field
    torch.testing.assert_close(out["encoder"], result.last_hidden_state)


def test_unknown_path_raises_model_error_with_close_names(bert):
    typo = r"encoder\.layer\.1\.attention\.self\.querry"
    with pytest.raises(ModelError, match=typo + r".*did you mean encoder\.layer\.1\.attention\.self\.query"):
        with capture_outputs(bert, ["encoder.layer.1.attention.self.querry"]):
            pass
    with pytest.raises(ModelError, match="encoder.layer.7"):
        with capture_outputs(bert, [QKV[0], "encoder.layer.7"]):
            pass
    # a failed resolution registers nothing
    assert len(bert.get_submodule(QKV[0])._forward_hooks) == 0
