"""Plain-torch reference for ``jvp_gated_residual``: FLUX's gated residual with tangents.

    out = h + g·y            ȯut = ḣ + ġ·y + g·ẏ
    dh = G,   dy = g·G,   dg = Σ_n G·y      (G the output gradient)

h, y (B, N, D); g (B, D) broadcast over N. Computed in float32 for 16-bit inputs (float64 for
float64), rounded once to the input dtype; dg is summed in the compute dtype.
"""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def jvp_gated_residual_forward(
    h: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    h_dot: torch.Tensor | None = None,
    gate_dot: torch.Tensor | None = None,
    y_dot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, ȯut) contiguous (B, N, D) in h's dtype; ȯut is None when every tangent is None."""
    dtype = _compute_dtype(h.dtype)
    g = gate.to(dtype)[:, None, :]
    yc = y.to(dtype)
    # Contiguous whatever h's strides, as the kernel writes it (.to alone keeps a float32 view).
    out = (h.to(dtype) + g * yc).to(h.dtype, memory_format=torch.contiguous_format).contiguous()
    if h_dot is None and gate_dot is None and y_dot is None:
        return out, None
    out_dot = torch.zeros(out.shape, dtype=dtype, device=out.device)
    if h_dot is not None:
        out_dot = out_dot + h_dot.to(dtype)
    if gate_dot is not None:
        out_dot = out_dot + gate_dot.to(dtype)[:, None, :] * yc
    if y_dot is not None:
        out_dot = out_dot + g * y_dot.to(dtype)
    return out, out_dot.to(h.dtype, memory_format=torch.contiguous_format).contiguous()


def jvp_gated_residual_backward(
    grad_out: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    need_h: bool = True,
    need_gate: bool = True,
    need_y: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dh, dgate (B, D), dy), None where not needed."""
    dtype = _compute_dtype(grad_out.dtype)
    dh = grad_out if need_h else None
    dy = (grad_out.to(dtype) * gate.to(dtype)[:, None, :]).to(y.dtype) if need_y else None
    dg = (grad_out.to(dtype) * y.to(dtype)).sum(1).to(gate.dtype) if need_gate else None
    return dh, dg, dy
