"""Triton kernel for ``jvp_activation``: GELU (tanh approximation) and SiLU with their tangents.

Both activations are written as y = x·σ(z), with σ the logistic function:

    gelu_tanh: z = 2c(x + a x³), c = √(2/π), a = 0.044715   (½(1 + tanh u) = σ(2u))
    silu:      z = x
    y' = σ(z) + x·σ(z)(1 − σ(z))·z'(x)          ẏ = y'·ẋ

One elementwise kernel, arithmetic in float32, with constexprs for the activation (KIND), the
primal output (WRITE_PRIMAL) and the tangent (HAS_TANGENT). The backward is the same kernel
with the output gradient in place of ẋ and no primal output: dx = y'·g.

The kernel reads and writes memory linearly, so the launchers make their inputs contiguous
(any strides are accepted) and return new contiguous tensors; no autograd here.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from meanflow.kernels.launch import cdiv, on_tensor_device

KIND_GELU_TANH, KIND_SILU = 0, 1
_KINDS = {"gelu_tanh": KIND_GELU_TANH, "silu": KIND_SILU}
_TWO_C = 2.0 * math.sqrt(2.0 / math.pi)
_A = 0.044715

# Elements per program: 16 per thread at 8 warps (two 16-byte vectors of bf16 per operand).
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _jvp_activation_kernel(
    x_ptr, t_ptr, y_ptr, y_dot_ptr, n_elements,
    TWO_C: tl.constexpr, A: tl.constexpr,
    KIND: tl.constexpr, WRITE_PRIMAL: tl.constexpr, HAS_TANGENT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n_elements
    x = tl.load(x_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    if HAS_TANGENT:  # loaded before the first store (meanflow.kernels: loads first)
        t = tl.load(t_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    if KIND == 0:  # gelu_tanh
        x2 = x * x
        z = TWO_C * (x + A * x2 * x)
        dz = TWO_C * (1.0 + 3.0 * A * x2)
    else:  # silu
        z = x
        dz = 1.0
    s = 1.0 / (1.0 + tl.exp(-z))
    if WRITE_PRIMAL:
        tl.store(y_ptr + offs, (x * s).to(y_ptr.dtype.element_ty), mask=in_range)
    if HAS_TANGENT:
        slope = s + x * s * (1.0 - s) * dz
        tl.store(y_dot_ptr + offs, (slope * t).to(y_dot_ptr.dtype.element_ty), mask=in_range)


def _launch(x, t, y, y_dot, kind, write_primal):
    n = x.numel()
    _jvp_activation_kernel[(cdiv(n, BLOCK),)](
        x, x if t is None else t, x if y is None else y, x if y_dot is None else y_dot, n,
        TWO_C=_TWO_C, A=_A, KIND=_KINDS[kind], WRITE_PRIMAL=write_primal, HAS_TANGENT=t is not None,
        BLOCK=BLOCK, num_warps=NUM_WARPS,
    )


@on_tensor_device
def jvp_activation_forward(
    x: torch.Tensor, x_dot: torch.Tensor | None, kind: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, ẏ) of ``kind`` ('gelu_tanh' or 'silu'); x, x_dot fp16/bf16/fp32 of one shape and dtype,
    any strides; y and ẏ contiguous."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {tuple(_KINDS)}, got {kind!r}")
    x = x.contiguous()
    x_dot = None if x_dot is None else x_dot.contiguous()
    y = torch.empty_like(x)
    y_dot = None if x_dot is None else torch.empty_like(x)
    _launch(x, x_dot, y, y_dot, kind, True)
    return y, y_dot


@on_tensor_device
def jvp_activation_backward(grad_y: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """dx = f'(x)·grad_y (contiguous); the forward kernel with grad_y as the tangent and no primal output."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {tuple(_KINDS)}, got {kind!r}")
    x, grad_y = x.contiguous(), grad_y.contiguous()
    dx = torch.empty_like(x)
    _launch(x, grad_y, None, dx, kind, False)
    return dx
