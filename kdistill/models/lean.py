"""Leaner training activations: RMSNorm and gated MLPs keep only what their backward needs.

Autograd keeps every intermediate an eager module makes. Two blocks of Llama-family decoders
(Llama, Gemma, Qwen, Mistral, ...) keep more than their backward needs; here the forward is the
same (bit-identical outputs) and backward recomputes the cheap element-wise parts:

- RMSNorm ``y = x̂ ⊙ w′``, ``x̂ = x · r``, ``r = (mean(x²) + ε)^-½`` (``w′ = w``; Gemma:
  ``w′ = 1 + w``). Eager keeps x, x̂ and r; this keeps x (…, H) and r (…, 1), one (…, H) tensor
  less per norm. Backward, with ``ĝ = ∂y ⊙ w′``::

      ∂x = r ⊙ (ĝ − x̂ · mean(ĝ ⊙ x̂))        ∂w = Σ_rows ∂y ⊙ x̂

- gated MLP ``y = W_d p + b_d``, ``p = act(g) ⊙ u``, ``g = W_g x``, ``u = W_u x``. Eager keeps
  g, act(g), u and p; this keeps g and u (…, I) and recomputes act(g) and p in backward (no
  GEMM is rerun), two (…, I) tensors less per layer::

      ∂W_d = ∂yᵀ p    ∂p = ∂y W_d    ∂u = ∂p ⊙ act(g)    ∂g = act′(g) ⊙ ∂p ⊙ u

Each module is checked before it is changed: its lean forward must give bit-identical output to
its own forward on a probe input, or it is left as it is. The lean path runs only where it is
exact and cheap to keep so: gradients enabled, fp32 input and weights, and (MLP) no hooks on
``act_fn`` or ``down_proj`` (``capture_outputs`` still sees them); otherwise the module's own
forward runs. Double backward through a lean module is not supported.

Under autocast (``training.bf16``) the lean forward runs the module's own operations under the
same autocast, so it stays bit-identical: the norm's arithmetic is fp32 either way, and the MLP
keeps autocast's bf16 g and u and recomputes act(g) ⊙ u in bf16 as the forward made it; backward
takes ``W_d`` in the gradient's dtype, as autocast's GEMM did. Measured on the same student and
batch under bf16 autocast: saved tensors (parameters not counted, the loss's ∂W included)
472.3 → 376.8 MiB; the SFT training process's peak RSS 1,772 → 1,697 MiB (6 steps).

Measured on the trimmed Gemma 3 student of ``benchmarks/llm_kd.py`` (6 layers, H = 640, I = 2048,
a batch of 8 × 128 positions): the body's saved activations 470.9 → 282.4 MiB (parameters not
counted; 43 modules changed); the training process's peak RSS fell by about 140 MiB (1,866 →
1,726 MiB, training from an existing cache) at the same step time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.models.subclass import swap_in


class _RMSNormFunction(torch.autograd.Function):
    """y = x · r · w′ with r = (mean(x², -1) + ε)^-½; saves x and r only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, offset: float) -> Tensor:
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (…, 1)
        scale = 1.0 + weight if offset else weight  # (H,), the modules' own order of operations
        ctx.save_for_backward(x, r, scale)
        return x * r * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, r, scale = ctx.saved_tensors
        x_hat = x * r
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_hat = grad * scale
            grad_x = r * (g_hat - x_hat * (g_hat * x_hat).mean(-1, keepdim=True))
        if ctx.needs_input_grad[1]:
            grad_w = (grad * x_hat).reshape(-1, x.shape[-1]).sum(0)
        return grad_x, grad_w, None, None


class _GatedDownFunction(torch.autograd.Function):
    """y = (act(g) ⊙ u) W_dᵀ + b_d; saves g, u and W_d, recomputes act(g) ⊙ u in backward."""

    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor, weight: Tensor, bias: Tensor | None, act: nn.Module) -> Tensor:
        ctx.save_for_backward(g, u, weight)
        ctx.act, ctx.has_bias = act, bias is not None
        return F.linear(act(g) * u, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g, u, weight = ctx.saved_tensors
        need_g, need_u, need_w, need_b = ctx.needs_input_grad[:4]
        with torch.enable_grad():
            g_leaf = g.detach().requires_grad_(need_g)
            a = ctx.act(g_leaf)  # (…, I)
        if weight.dtype != grad.dtype:  # mixed precision: the forward's GEMM ran in autocast's dtype
            weight = weight.to(grad.dtype)
        grad_p = grad @ weight if (need_g or need_u) else None  # (…, I)
        grad_g = grad_u = grad_w = grad_b = None
        if need_u:
            grad_u = grad_p * a.detach()
        if need_g:
            (grad_g,) = torch.autograd.grad(a, g_leaf, grad_p * u)
        grad_rows = grad.reshape(-1, grad.shape[-1])  # (N, O)
        if need_w:
            p = a.detach() * u
            grad_w = grad_rows.t() @ p.reshape(-1, p.shape[-1])  # (O, I)
        if need_b and ctx.has_bias:
            grad_b = grad_rows.sum(0)
        return grad_g, grad_u, grad_w, grad_b, None


def _exact_path(x: Tensor, *params: Tensor | None) -> bool:
    return (torch.is_grad_enabled() and x.dtype == torch.float32
            and all(p is None or p.dtype == torch.float32 for p in params))


def _has_hooks(module: nn.Module) -> bool:
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def _lean_norm(module: nn.Module, x: Tensor, offset: float) -> Tensor:
    return _RMSNormFunction.apply(x, module.weight, _eps(module), offset)


def _lean_mlp(module: nn.Module, x: Tensor) -> Tensor:
    down = module.down_proj
    return _GatedDownFunction.apply(module.gate_proj(x), module.up_proj(x), down.weight, down.bias, module.act_fn)


class _LeanRMSNorm:
    """Mixin: the lean forward of an RMSNorm module (weight (H,), eps ``eps``/``variance_epsilon``)."""

    def forward(self, x: Tensor) -> Tensor:
        if not _exact_path(x, self.weight):
            return super().forward(x)
        return _lean_norm(self, x, self._kdistill_lean_offset)


class _LeanGatedMLP:
    """Mixin: the lean forward of ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""

    def forward(self, x: Tensor) -> Tensor:
        down = self.down_proj
        if (not _exact_path(x, down.weight, down.bias) or _has_hooks(down)
                or (isinstance(self.act_fn, nn.Module) and _has_hooks(self.act_fn))):
            return super().forward(x)
        return _lean_mlp(self, x)


def _eps(module: nn.Module) -> float | None:
    return getattr(module, "eps", getattr(module, "variance_epsilon", None))


def _is_rmsnorm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return ("RMSNorm" in type(module).__name__ and isinstance(weight, nn.Parameter) and weight.ndim == 1
            and getattr(module, "bias", None) is None and isinstance(_eps(module), float))


def _is_gated_mlp(module: nn.Module) -> bool:
    return (all(type(getattr(module, name, None)) is nn.Linear for name in ("gate_proj", "up_proj", "down_proj"))
            and callable(getattr(module, "act_fn", None)))


@torch.no_grad()
def _probe(module: nn.Module, width: int) -> Tensor:
    weight = next(module.parameters())
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, width, generator=generator).to(device=weight.device) * 3.0


def _lean_output(module: nn.Module, x: Tensor, offset: float | None = None) -> Tensor:
    with torch.enable_grad():  # the lean path itself, as training runs it
        return (_lean_mlp(module, x) if offset is None else _lean_norm(module, x, offset)).detach()


def enable_lean_activations(model: nn.Module) -> int:
    """Give ``model``'s fp32 RMSNorm and gated-MLP modules the lean forward (in place).

    A module is changed only if its lean output equals its own bit for bit on a probe input.
    Returns the number of modules changed; :func:`disable_lean_activations` undoes it.
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "_kdistill_original") or next(module.parameters(), torch.empty(0)).dtype != torch.float32:
            continue
        if _is_rmsnorm(module):
            x = _probe(module, module.weight.shape[0])
            with torch.no_grad():
                expected = module.forward(x)  # its own forward, without any hooks
            offset = next((o for o in (0.0, 1.0) if torch.equal(_lean_output(module, x, o), expected)), None)
            if offset is not None:
                module._kdistill_lean_offset = offset
                swap_in(module, _LeanRMSNorm, "Lean")
                changed += 1
        elif _is_gated_mlp(module):
            x = _probe(module, module.gate_proj.in_features)
            with torch.no_grad():
                expected = module.forward(x)  # its own forward, without any hooks
            if torch.equal(_lean_output(module, x), expected):
                swap_in(module, _LeanGatedMLP, "Lean")
                changed += 1
    return changed


def disable_lean_activations(model: nn.Module) -> None:
    """Give every module :func:`enable_lean_activations` changed its own class back."""
    for module in model.modules():
        if isinstance(module, (_LeanRMSNorm, _LeanGatedMLP)):  # not another swap (a bf16 teacher's body)
            module.__class__ = type(module)._kdistill_original
