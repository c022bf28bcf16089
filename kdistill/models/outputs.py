"""One forward pass that returns what distillation needs from a model, for students and teachers."""

from __future__ import annotations

from torch import Tensor, nn

from kdistill.models.hooks import capture_outputs


def forward_module(model: nn.Module, task: str) -> nn.Module:
    """The module :func:`forward_outputs` runs: ``model.base_model`` for a causal LM, else ``model``."""
    return model.base_model if task == "causal" else model


def forward_outputs(
    model: nn.Module, task: str, inputs: dict[str, Tensor], hidden_states: bool, modules: list[str]
) -> dict:
    """Run ``model`` on ``inputs``.

    Returns ``logits`` ((B, C) or (B, L, V); None for causal LMs), ``final_hidden`` ((B, L, H),
    causal LMs only: the input of the LM head, so that logits can be made chunk by chunk),
    ``hidden_states`` (tuple of (B, L, H), embeddings first, when asked) and ``captured``
    (module path → output, for the hooked ``modules``).
    """
    with capture_outputs(model, modules) as captured:
        module = forward_module(model, task)
        if task == "causal":
            # no KV cache: nothing is generated, and a cache would keep every layer's K and V alive
            out = module(**inputs, output_hidden_states=hidden_states, use_cache=False)
            result = {"logits": None, "final_hidden": out.last_hidden_state}
        else:
            out = module(**inputs, output_hidden_states=hidden_states)
            result = {"logits": out.logits, "final_hidden": None}
    result["hidden_states"] = tuple(out.hidden_states or ()) if hidden_states else ()
    result["captured"] = dict(captured)
    return result
