"""Plain-torch reference for ``jvp_rope``: FLUX's rotary embedding with a tangent.

diffusers' ``apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1)`` on
interleaved pairs (x[2i], x[2i+1]):

    rot(x)[2i] = −x[2i+1],  rot(x)[2i+1] = x[2i]
    y = x·cos + rot(x)·sin          (in float32, or wider if cos/sin are, rounded to x's dtype)

The rotation does not depend on t, so ẏ = ẋ·cos + rot(ẋ)·sin. The backward is the transpose:
dx = g·cos − rot(g·sin), i.e. dx[2i] = g[2i]cos[2i] + g[2i+1]sin[2i+1],
dx[2i+1] = g[2i+1]cos[2i+1] − g[2i]sin[2i]. No gradient reaches cos and sin.

Shapes: x (B, H, N, D) with D even, any strides; cos, sin (N, D).
"""
from __future__ import annotations

import torch


def _compute_dtype(x: torch.Tensor, cos: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, torch.float32), cos.dtype)


def _rotate(x: torch.Tensor) -> torch.Tensor:
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(x, cos)
    # Contiguous whatever x's strides (FLUX's transposed view), as the kernel writes it.
    return (x.to(dtype) * cos.to(dtype) + _rotate(x).to(dtype) * sin.to(dtype)).to(
        x.dtype, memory_format=torch.contiguous_format).contiguous()  # (.to alone keeps a float32 view)


def jvp_rope_forward(
    x: torch.Tensor, x_dot: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, ẏ) contiguous (B, H, N, D) in x's dtype; ẏ is None when x_dot is None."""
    return _apply(x, cos, sin), None if x_dot is None else _apply(x_dot, cos, sin)


def jvp_rope_backward(grad_y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """dx = g·cos − rot(g·sin), in grad_y's dtype."""
    dtype = _compute_dtype(grad_y, cos)
    g = grad_y.to(dtype)
    return (g * cos.to(dtype) - _rotate(g * sin.to(dtype))).to(grad_y.dtype)
