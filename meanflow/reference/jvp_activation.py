"""Plain-torch reference for ``jvp_activation``: GELU (tanh approximation) and SiLU with tangents.

    gelu_tanh: y = ½x(1 + tanh u),  u = c(x + a x³),  c = √(2/π),  a = 0.044715
               y' = ½(1 + tanh u) + ½x(1 − tanh² u)·c(1 + 3a x²)
    silu:      y = x σ(x),           y' = σ(x)(1 + x(1 − σ(x)))
    ẏ = y'(x)·ẋ;  backward: dx = y'(x)·g (the same product with g in place of ẋ).

Computed in float32 for 16-bit inputs (float64 for float64) and rounded once to the input dtype.
"""
from __future__ import annotations

import math

import torch

KINDS = ("gelu_tanh", "silu")
_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _value_and_slope(x: torch.Tensor, kind: str, need_value: bool = True):
    """(f(x), f'(x)) in x's dtype (already the compute dtype)."""
    if kind == "gelu_tanh":
        t = torch.tanh(_C * (x + _A * x * x * x))
        value = 0.5 * x * (1.0 + t) if need_value else None
        slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _C * (1.0 + 3.0 * _A * x * x)
        return value, slope
    if kind == "silu":
        s = torch.sigmoid(x)
        value = x * s if need_value else None
        return value, s * (1.0 + x * (1.0 - s))
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def jvp_activation_forward(
    x: torch.Tensor, x_dot: torch.Tensor | None, kind: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, ẏ) of the activation ``kind``; ẏ is None when x_dot is None."""
    xc = x.to(_compute_dtype(x.dtype))
    if x_dot is None:
        if kind == "gelu_tanh":
            y = torch.nn.functional.gelu(xc, approximate="tanh")
        elif kind == "silu":
            y = torch.nn.functional.silu(xc)
        else:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return y.to(x.dtype), None
    value, slope = _value_and_slope(xc, kind)
    return value.to(x.dtype), (slope * x_dot.to(xc.dtype)).to(x.dtype)


def jvp_activation_backward(grad_y: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """dx = f'(x)·grad_y, in x's dtype."""
    xc = x.to(_compute_dtype(x.dtype))
    _, slope = _value_and_slope(xc, kind, need_value=False)
    return (slope * grad_y.to(xc.dtype)).to(x.dtype)
