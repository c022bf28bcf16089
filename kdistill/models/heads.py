"""Output heads of Hugging Face language models, as :class:`kdistill.losses.LMHead`.

The chunked LM loss needs the head as weight + the logit transforms the model applies after
it, read from the config: Gemma 2/3 ``final_logit_softcapping`` (``cap · tanh(z / cap)``),
Cohere ``logit_scale`` (``z · s``), Granite ``logits_scaling`` (``z / s``).
"""

from __future__ import annotations

from torch import Tensor, nn

from kdistill.errors import ModelError
from kdistill.losses.chunked import LMHead


def _text_config(model: nn.Module):
    config = model.config
    return getattr(config, "text_config", None) or config


def lm_head_of(model: nn.Module) -> LMHead:
    """The model's output head with its scaling and soft-capping."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if not isinstance(head, nn.Linear):
        raise ModelError(f"{type(model).__name__} has no linear output head (is it a *ForCausalLM / *ForMaskedLM?)")
    config = _text_config(model)
    scale = 1.0
    if getattr(config, "logit_scale", None):
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LMHead.from_linear(head, scale=scale, softcap=float(softcap) if softcap else None)


def final_hidden_states(model: nn.Module, **inputs: Tensor) -> Tensor:
    """Final (normed) hidden states of a *ForCausalLM / *ForMaskedLM without computing logits.

    Returns (B, L, H): the base model's ``last_hidden_state``.
    """
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ModelError(f"cannot find the base model inside {type(model).__name__}")
    return base(**inputs).last_hidden_state
