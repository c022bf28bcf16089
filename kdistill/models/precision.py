"""A frozen teacher's inference precision, and teacher weights that own their memory.

``bfloat16``: the body's ``nn.Linear`` weights are stored in bf16 and the body (the transformer
``base_model``) runs under bf16 autocast, so its GEMMs run in bf16 while norms, softmaxes and the
residual stream stay fp32 as autocast keeps them. The embeddings and the output head keep their
dtype (fp32), so logits and the loss's teacher rows are computed in fp32 from an fp32 final
hidden state. Whoever calls the model (kdistill's loss, ``kdistill cache``, another trainer) gets
the same behaviour.

Measured on 2 CPU cores (AMD EPYC, AVX512-BF16): a (1024 × 640) · (640 × 2048) · (2048 × 640)
pair of Linears takes 57.6 ms in fp32, 13.4 ms in bf16; Gemma 3 270M's body 1.64–1.72× faster
(``benchmarks/teacher_precision.py``; norms, attention and element-wise work do not speed up).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kdistill.errors import ModelError
from kdistill.models.subclass import swap_in

Precision = Literal["float32", "bfloat16"]


def set_inference_precision(model: nn.Module, precision: Precision | None) -> nn.Module:
    """Run ``model``'s body in ``precision`` (in place; None or float32: unchanged). Returns it.

    The body is ``model.base_model`` (the model itself when it has no head); its Linear (and
    GPT-2 Conv1D) weights become bf16 except any that is the output head's or an embedding's
    (tied or not). The body's forward runs under ``torch.autocast(<device of its weights>,
    dtype=torch.bfloat16)`` (its class becomes a subclass that adds this) and hands its bf16
    outputs (e.g. BERT's pooler output) on as fp32, so the heads outside the body take them as
    they are.
    """
    if precision in (None, "float32"):
        return model
    if precision != "bfloat16":
        raise ModelError(f"teacher dtype {precision!r} is not one of float32, bfloat16")
    body = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep = {id(p) for p in (head.parameters() if head is not None else ())}
    keep |= {id(p) for module in body.modules() if isinstance(module, nn.Embedding) for p in module.parameters()}
    for module in body.modules():
        if isinstance(module, (nn.Linear, Conv1D)) and id(module.weight) not in keep:
            module.to(torch.bfloat16)
    if not isinstance(body, _Bf16Autocast):
        swap_in(body, _Bf16Autocast, "Bf16")
        _register_outputs(body)
    return model


def _register_outputs(body: nn.Module) -> None:
    """Give the swapped class the outputs (hidden states, attentions) its original class records.

    transformers 5 keys what a model may record on the name of its class, registered at init."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers that does not key it on the class
        return
    if getattr(body, "_can_record_outputs", None) is not None:
        _CAN_RECORD_REGISTRY[body] = body._can_record_outputs


# A subclass swapped in, not hooks that open and close an autocast context: a ``with`` in
# ``forward`` is what ``torch.compile`` traces (another trainer may compile the teacher), the
# context closes when the forward raises, and a deep copy of the model keeps the behaviour.


class _Bf16Autocast:
    """Mixin: the module's forward under bf16 autocast on its weights' device; bf16 outputs as fp32."""

    def forward(self, *args, **kwargs):
        device = next(self.parameters()).device.type
        with torch.autocast(device, dtype=torch.bfloat16):
            output = super().forward(*args, **kwargs)
        return _as_fp32(output)


def _as_fp32(value: object) -> object:
    """bf16 tensors in a (nested) output as fp32; everything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype == torch.bfloat16 else value
    if isinstance(value, dict):  # ModelOutput included: items are updated in place
        for key, item in list(value.items()):
            value[key] = _as_fp32(item)
        return value
    if type(value) in (tuple, list):
        return type(value)(_as_fp32(item) for item in value)
    return value


def own_memory(model: nn.Module) -> nn.Module:
    """Copy every parameter and buffer into memory of its own (in place; tying kept). Returns it.

    ``from_pretrained`` may leave weights as views of the memory-mapped checkpoint file. Once a
    trimmed teacher has dropped most of its embedding rows, the mapping still holds every page
    loading or hashing touched (for Gemma 3 270M, ~770 MB of the file resident against the
    ~450 MB the trimmed teacher needs); after this copy the mapping is released.
    """
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.clone()
    return model
