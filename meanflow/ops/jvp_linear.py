"""``jvp_linear``: ``F.linear`` whose tangent is computed outside autograd.

    y = x Wᵀ + b              ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ

Both backends run two GEMMs, y = x Wᵀ + b (the bias in the GEMM's epilogue) and ẋ Wᵀ (cuBLAS
on CUDA: a Triton GEMM would not beat it); x Ẇᵀ and ḃ, present only when forward AD runs
through the parameters, are added to the tangent. On CUDA, ``MEANFLOW_LINEAR_STACKED=1`` runs
one GEMM over the stacked rows [x; ẋ] instead, which measured slower on an H100 at FLUX's shapes
(``meanflow.kernels.jvp_linear``). The tangent is detached (no ``grad_fn``); gradients reach x,
W, b through y only, by the standard linear backward from the saved x (dx = g W, dW = gᵀ x,
db = Σ g), not a recompute.

Under autocast, x, W and b are cast to the autocast dtype first, as ``F.linear`` does (float64
ones stay float64, as there).
"""
from __future__ import annotations

import torch

from meanflow.ops._checks import (FLOAT_DTYPES, autocast, check_like, check_tangent, check_tensor,
                                  zeros_if_none)
from meanflow.ops.dispatch import implementation, resolve_backend
from meanflow.ops.pair import KERNEL_OP, PairOp, apply_pair


def _forward(inputs, tangents, options):
    (backend,) = options
    y, y_dot = implementation("jvp_linear", backend).jvp_linear_forward(*inputs, *tangents)
    return y, y_dot, ()


def _backward(inputs, y, extras, options, grad_y, needs_input_grad):
    x, weight, bias = inputs
    (backend,) = options
    need_x, need_w, need_b = needs_input_grad
    return implementation("jvp_linear", backend).jvp_linear_backward(
        grad_y, x, weight, need_x, need_w, need_b and bias is not None)


# Inputs (x, weight, bias): x (..., Din), weight (Dout, Din), bias None or (Dout,). Options
# (backend,). Output (..., Dout). Nothing saved but the inputs.
JVP_LINEAR = PairOp("jvp_linear", _forward, _backward, input_names=("x", "weight", "bias"), **KERNEL_OP)


def _validate(x, weight, bias) -> str:
    check_tensor("x", x, FLOAT_DTYPES)
    check_tensor("weight", weight, FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension (..., Din), got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (Dout, Din), got shape {tuple(weight.shape)}")
    check_like("weight", weight, "x", x)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight's Din {weight.shape[1]} must equal x's last dimension {x.shape[-1]} "
                         f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}")
        check_like("bias", bias, "x", x)
    return "reference" if x.numel() == 0 or weight.numel() == 0 else resolve_backend(x.device)


def jvp_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` that works under ``torch.func.jvp`` / forward AD, its
    tangent computed beside it (a second GEMM) and never recorded for backward.

    Args:
        x: (..., Din), float16 / bfloat16 / float32 / float64.
        weight: (Dout, Din), x's dtype and device. May carry a forward-AD tangent.
        bias: None or (Dout,). May carry a forward-AD tangent.

    Returns:
        (..., Dout) in x's dtype; under forward AD its tangent ẋWᵀ + xẆᵀ + ḃ has no ``grad_fn``.

    Raises:
        ValueError: naming the argument, for shapes, dtypes or devices that do not fit.
    """
    x, weight, bias = autocast(x, weight, bias)
    backend = _validate(x, weight, bias)
    y, _ = apply_pair(JVP_LINEAR, (x, weight, bias), None, (backend,))
    return y


def jvp_linear_pair(
    x: torch.Tensor,
    x_dot: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight_dot: torch.Tensor | None = None,
    bias_dot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit (y, ẏ) form for the pair-mode forward of a network.

    Args:
        x, weight, bias: as ``jvp_linear``.
        x_dot, weight_dot, bias_dot: tangents shaped and typed like their primals, or None
            (zero, no work).

    Returns:
        y: (..., Dout), differentiable to x, weight, bias.
        y_dot: (..., Dout), detached (no ``grad_fn``, also where a tangent requires grad); zeros
            when every tangent is None.
    """
    check_tensor("x", x, FLOAT_DTYPES)
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_tangent("x_dot", x_dot, x)
    check_tangent("weight_dot", weight_dot, weight)
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES)
        check_tangent("bias_dot", bias_dot, bias)
    elif bias_dot is not None:
        raise ValueError("bias_dot was given without a bias")
    x, x_dot, weight, weight_dot, bias, bias_dot = autocast(x, x_dot, weight, weight_dot, bias, bias_dot)
    backend = _validate(x, weight, bias)
    y, y_dot = apply_pair(JVP_LINEAR, (x, weight, bias), (x_dot, weight_dot, bias_dot), (backend,))
    return y, zeros_if_none(y_dot, y)
