"""benchmarks/floors.py: FLOP counts, GEMM rate and training-state bytes that the llm_kd floors rest on."""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from floors import count_flops, gemm_rate, gemm_shapes, tensor_bytes, training_state_bytes  # noqa: E402


def test_count_flops_is_six_m_k_n_for_a_linear_forward_and_backward():
    layer = nn.Linear(12, 20, bias=False)
    x = torch.randn(7, 12, requires_grad=True)
    flops = count_flops(lambda: layer(x).sum().backward())
    assert flops == 3 * 2 * 7 * 12 * 20  # y = xW, ∂x = ∂y Wᵀ, ∂W = xᵀ ∂y


def test_count_flops_of_a_no_grad_forward_is_the_forward_only():
    layer = nn.Linear(12, 20, bias=False)
    with torch.no_grad():
        assert count_flops(lambda: layer(torch.randn(7, 12))) == 2 * 7 * 12 * 20


def test_gemm_shapes_cover_forward_input_and_weight_gradients():
    assert gemm_shapes(4, [8], 16) == [(16, 4, 8, False), (16, 8, 4, False), (4, 16, 8, True)]


def test_gemm_rate_is_a_finite_positive_rate_in_each_dtype():
    shapes = gemm_shapes(64, [128], 64)
    for dtype in (torch.float32, torch.bfloat16):
        rate = gemm_rate(shapes, dtype, repeats=2)
        assert 0 < rate < 1e15


def test_training_state_bytes_counts_tied_weights_once_and_frozen_modules_whole():
    student = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    student[1].weight = student[0].weight  # tied, as a causal LM's embedding and head
    teacher = nn.Linear(4, 6)
    assert tensor_bytes(student) == 10 * 4 * 4
    assert tensor_bytes(teacher) == (4 * 6 + 6) * 4
    # student weights, gradient, two fp32 moments; teacher weights
    assert training_state_bytes(student, [teacher]) == 4 * 160 + (4 * 6 + 6) * 4


def test_training_state_bytes_skips_gradients_and_moments_of_frozen_student_parameters():
    student = nn.Linear(4, 4, bias=False)
    student.weight.requires_grad_(False)
    assert training_state_bytes(student) == 64


def test_training_state_bytes_matches_what_adamw_allocates():
    student = nn.Linear(16, 8)
    optimizer = torch.optim.AdamW(student.parameters())
    student(torch.randn(3, 16)).sum().backward()
    optimizer.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in student.parameters())
    moments = sum(t.numel() * t.element_size() for st in optimizer.state.values()
                  for k, t in st.items() if k != "step")
    assert training_state_bytes(student) == tensor_bytes(student) + grads + moments


def test_tensor_bytes_counts_a_tensor_shared_between_student_and_teacher_once():
    shared = nn.Linear(4, 4, bias=False)
    student, teacher = nn.Sequential(shared), nn.Sequential(shared, nn.Linear(4, 2, bias=False))
    assert tensor_bytes(student, teacher) == (16 + 8) * 4
    student.requires_grad_(False)
    assert training_state_bytes(student, [teacher]) == (16 + 8) * 4
