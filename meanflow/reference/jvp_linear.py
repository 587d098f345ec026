"""Plain-torch reference for ``jvp_linear``: the test oracle and the CPU path.

    y = x Wᵀ + b              ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ

Two GEMMs (three with a weight tangent), in the input dtype as ``F.linear`` computes them.
Backward, from the saved x: dx = g W, dW = gᵀ x (over all leading dims), db = Σ g.

Shapes: x (..., Din), weight (Dout, Din), bias None or (Dout,); tangents shaped like their
primals or None. Launchers return y (..., Dout) and ẏ (or None when no tangent is given).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def jvp_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_dot: torch.Tensor | None = None,
    weight_dot: torch.Tensor | None = None,
    bias_dot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, ẏ): ẏ is None when every tangent is None."""
    y = F.linear(x, weight, bias)
    y_dot = None if x_dot is None else F.linear(x_dot, weight)
    return y, add_parameter_tangent(y_dot, x, weight_dot, bias_dot, y.shape)


def add_parameter_tangent(
    y_dot: torch.Tensor | None,
    x: torch.Tensor,
    weight_dot: torch.Tensor | None,
    bias_dot: torch.Tensor | None,
    shape: torch.Size,
) -> torch.Tensor | None:
    """ẏ + x Ẇᵀ + ḃ (the parameters' tangents, rare), shaped ``shape`` = y's; None if all absent."""
    if weight_dot is not None:
        term = F.linear(x, weight_dot)
        y_dot = term if y_dot is None else y_dot + term
    if bias_dot is not None:
        y_dot = bias_dot.expand(shape).clone() if y_dot is None else y_dot + bias_dot
    return y_dot


def jvp_linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    need_x: bool = True,
    need_weight: bool = True,
    need_bias: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dW, db), None where not needed: the standard linear backward."""
    dx = torch.matmul(grad_y, weight) if need_x else None
    g2 = as_rows(grad_y)
    dw = torch.matmul(g2.t(), as_rows(x)) if need_weight else None
    db = g2.sum(0) if need_bias else None
    return dx, dw, db


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., D) as (rows, D); unlike reshape(-1, D), also for D = 0 or no rows (under vmap too)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
