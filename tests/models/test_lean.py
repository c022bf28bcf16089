"""Lean RMSNorm / gated-MLP activations: the same forward and gradients, fewer saved tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from kdistill.models.hooks import capture_outputs
from kdistill.models.lean import disable_lean_activations, enable_lean_activations

B, L, H, M = 2, 12, 32, 64  # batch, length, hidden width, MLP width


def _gemma() -> nn.Module:
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=H, intermediate_size=M, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              max_position_embeddings=64, sliding_window=16)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # Gemma's norm weights start at 0 (w′ = 1 + w): make them differ
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=H, intermediate_size=M, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         mlp_bias=True, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.normal_(1, 0.5)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (B, L), generator=torch.Generator().manual_seed(1))


def _loss_and_grads(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    ids = _ids()
    logits = model(input_ids=ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_as_accurate(grads: dict[str, torch.Tensor], eager: dict[str, torch.Tensor],
                        exact: dict[str, torch.Tensor]) -> None:
    """Lean fp32 gradients are as close to the fp64 ones as eager fp32 gradients are (within 4×,
    plus 1e-6 of the gradient's size for where eager happens to round exactly)."""
    assert grads.keys() == eager.keys() == exact.keys()
    for name, grad in grads.items():
        truth = exact[name].float()
        lean_error, eager_error = (grad - truth).abs().max(), (eager[name] - truth).abs().max()
        assert lean_error <= 4 * eager_error + 1e-6 * truth.abs().max(), (name, lean_error, eager_error)


def _saved_activation_bytes(model: nn.Module, run=None) -> int:
    """Bytes autograd keeps for backward in ``run()`` (default: one forward), parameters not
    counted (one count per storage)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if run is None:
            model(input_ids=_ids(), use_cache=False)
        else:
            run()
    return sum(seen.values())


@pytest.mark.parametrize("build, norms_per_layer", [(_gemma, 6), (_llama, 2)])
def test_same_logits_bit_for_bit_and_same_gradients(build, norms_per_layer) -> None:
    model = build()
    reference, exact = copy.deepcopy(model), copy.deepcopy(model).double()
    n_layers = model.config.num_hidden_layers
    assert enable_lean_activations(model) == n_layers * (norms_per_layer + 1) + 1  # + final norm
    logits, loss, grads = _loss_and_grads(model)
    ref_logits, ref_loss, ref_grads = _loss_and_grads(reference)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
    _assert_as_accurate(grads, ref_grads, _loss_and_grads(exact)[2])
    assert grads["model.layers.0.mlp.down_proj.weight"].abs().sum() > 0
    assert grads["model.layers.0.input_layernorm.weight"].abs().sum() > 0


# per layer: hidden-size norms, and the widths of the per-head q/k norms (Gemma: 2 heads × 16, 1 × 16)
@pytest.mark.parametrize("build, hidden_norms, head_norm_widths", [(_gemma, 4, (32, 16)), (_llama, 2, ())])
def test_keeps_two_intermediate_and_one_input_sized_tensor_less(build, hidden_norms, head_norm_widths) -> None:
    model = build()
    before = _saved_activation_bytes(model)
    enable_lean_activations(model)
    after = _saved_activation_bytes(model)
    f32 = 4
    mlp = 2 * B * L * M * f32  # act(g) and act(g) ⊙ u
    norms = sum(B * L * width * f32 for width in (H,) * hidden_norms + head_norm_widths)  # x̂ per norm
    assert before - after >= model.config.num_hidden_layers * (mlp + norms) + B * L * H * f32  # + final norm


def test_gradient_checkpointing_and_lean_activations_together() -> None:
    model = _gemma()
    reference, exact = copy.deepcopy(model), copy.deepcopy(model).double()
    enable_lean_activations(model)
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    reference.train()
    _, loss, grads = _loss_and_grads(model)
    _, ref_loss, ref_grads = _loss_and_grads(reference)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    _assert_as_accurate(grads, ref_grads, _loss_and_grads(exact)[2])


def test_hooked_activation_is_still_captured() -> None:
    model = _gemma()
    enable_lean_activations(model)
    with capture_outputs(model, ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.down_proj"]) as out:
        model(input_ids=_ids(), use_cache=False).logits.sum().backward()
    assert out["model.layers.0.mlp.act_fn"].shape == (B, L, M)
    assert out["model.layers.1.mlp.down_proj"].shape == (B, L, H)


@pytest.mark.parametrize("make", [_gemma, _llama])
def test_under_bf16_autocast_lean_is_exact_and_keeps_less(make) -> None:
    """Under autocast the lean modules run too: the same logits bit for bit, the same gradients
    (to fp32 summation order), fewer saved bytes."""
    model = make()
    reference = copy.deepcopy(model)
    assert enable_lean_activations(model) > 0
    results = {}
    for name, m in (("lean", model), ("eager", reference)):
        m.zero_grad(set_to_none=True)

        def run(m=m, name=name) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = m(input_ids=_ids(), use_cache=False).logits
            results[name] = logits.detach()
            logits.float().square().mean().backward()

        results[name + "_saved"] = _saved_activation_bytes(m, run)
        results[name + "_grads"] = {n: p.grad for n, p in m.named_parameters()}
    assert torch.equal(results["lean"], results["eager"])
    assert results["lean_saved"] < results["eager_saved"]
    for name, grad in results["eager_grads"].items():
        torch.testing.assert_close(results["lean_grads"][name], grad, rtol=1e-5,
                                   atol=1e-6 * grad.abs().max().item(), msg=name)


def test_no_grad_runs_the_modules_own_forward() -> None:
    model = _gemma()
    reference = copy.deepcopy(model)
    enable_lean_activations(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).logits, reference(input_ids=_ids()).logits)


class OddRMSNorm(nn.Module):
    """Named like an RMSNorm, computes something else (mean-centred): must stay as it is."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class PlainGatedMLP(nn.Module):
    def __init__(self, squared: bool) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(H, M), nn.Linear(H, M), nn.Linear(M, H)
        self.act_fn = nn.SiLU()
        self.squared = squared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(p * p if self.squared else p)


def test_only_modules_whose_lean_forward_is_exact_are_changed() -> None:
    model = nn.Sequential(OddRMSNorm(H), PlainGatedMLP(squared=True), PlainGatedMLP(squared=False))
    assert enable_lean_activations(model) == 1
    assert [type(m).__name__ for m in model] == ["OddRMSNorm", "PlainGatedMLP", "LeanPlainGatedMLP"]
    assert enable_lean_activations(model) == 0  # idempotent
    disable_lean_activations(model)
    assert [type(m).__name__ for m in model] == ["OddRMSNorm", "PlainGatedMLP", "PlainGatedMLP"]


def test_disable_restores_the_original_classes() -> None:
    model = _llama()
    classes = [type(m) for m in model.modules()]
    enable_lean_activations(model)
    assert type(model.model.norm).__name__ == "LeanLlamaRMSNorm"
    assert isinstance(model.model.norm, classes[[c.__name__ for c in classes].index("LlamaRMSNorm")])
    disable_lean_activations(model)
    assert [type(m) for m in model.modules()] == classes


def test_a_bf16_model_is_left_alone() -> None:
    model = _llama().to(torch.bfloat16)
    assert enable_lean_activations(model) == 0
