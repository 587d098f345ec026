"""``jvp_gated_residual``: FLUX's gated residual ``h + gate.unsqueeze(1) * y`` with its tangent.

    out = h + g·y            ȯut = ḣ + ġ·y + g·ẏ        (each tangent optional)

h, y (B, N, D); g (B, D) or (B, 1, D), broadcast over the N tokens. One Triton pass computes
out and ȯut in float32 and rounds once (diffusers rounds g·y and then the sum). Backward:
dh = G, dy = g·G, dg = Σ_n G·y. The tangent carries no ``grad_fn``.
"""
from __future__ import annotations

import torch

from meanflow.ops._checks import (FLOAT_DTYPES, check_like, check_tangent, check_tensor, check_triton_dtype,
                                  zeros_if_none)
from meanflow.ops.dispatch import implementation, resolve_backend
from meanflow.ops.pair import KERNEL_OP, PairOp, apply_pair, backward_backend


def _forward(inputs, tangents, options):
    (backend,) = options
    out, out_dot = implementation("jvp_gated_residual", backend).jvp_gated_residual_forward(*inputs, *tangents)
    return out, out_dot, ()


def _backward(inputs, out, extras, options, grad_out, needs_input_grad):
    h, gate, y = inputs
    (backend,) = options
    impl = implementation("jvp_gated_residual", backward_backend(backend))
    return impl.jvp_gated_residual_backward(grad_out, gate, y, *needs_input_grad)


# Inputs (h, gate, y): h, y (B, N, D), gate (B, D). Options (backend,). Output (B, N, D).
JVP_GATED_RESIDUAL = PairOp("jvp_gated_residual", _forward, _backward,
                            input_names=("h", "gate", "y"), **KERNEL_OP)


def _validate(h, gate, y):
    """Returns (backend, gate as (B, D))."""
    check_tensor("h", h, FLOAT_DTYPES)
    check_tensor("gate", gate, FLOAT_DTYPES)
    check_tensor("y", y, FLOAT_DTYPES)
    if h.dim() != 3:
        raise ValueError(f"h must be (B, N, D), got shape {tuple(h.shape)}")
    if y.shape != h.shape:
        raise ValueError(f"y must have h's shape {tuple(h.shape)}, got {tuple(y.shape)}")
    b, _, d = h.shape
    if gate.shape == (b, 1, d):
        gate = gate.squeeze(1)
    if gate.shape != (b, d):
        raise ValueError(f"gate must be (B, D) = ({b}, {d}) or (B, 1, D), got shape {tuple(gate.shape)}")
    check_like("gate", gate, "h", h)
    check_like("y", y, "h", h)
    backend = "reference" if h.numel() == 0 else resolve_backend(h.device)
    if backend == "triton":
        check_triton_dtype("jvp_gated_residual", "h", h)
    return backend, gate


def jvp_gated_residual(h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``h + gate.unsqueeze(1) * y`` (gate (B, D)) that works under ``torch.func.jvp`` / forward AD.

    Args:
        h: (B, N, D) the residual stream; float16 / bfloat16 / float32 (float64 on reference).
        gate: (B, D) or (B, 1, D), h's dtype and device.
        y: (B, N, D) the branch output.

    Returns:
        (B, N, D) contiguous in h's dtype; its forward-AD tangent has no ``grad_fn``.
    """
    backend, gate = _validate(h, gate, y)
    out, _ = apply_pair(JVP_GATED_RESIDUAL, (h, gate, y), None, (backend,))
    return out


def jvp_gated_residual_pair(
    h: torch.Tensor,
    h_dot: torch.Tensor | None,
    gate: torch.Tensor,
    gate_dot: torch.Tensor | None,
    y: torch.Tensor,
    y_dot: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, ȯut): out differentiable to h, gate, y; ȯut = ḣ + ġ·y + g·ẏ detached (zeros if
    every tangent is None). Tangents are shaped like their primals (gate_dot like gate)."""
    for name, t in (("h", h), ("gate", gate), ("y", y)):
        check_tensor(name, t, FLOAT_DTYPES)
    check_tangent("h_dot", h_dot, h)
    check_tangent("gate_dot", gate_dot, gate)
    check_tangent("y_dot", y_dot, y)
    backend, gate2 = _validate(h, gate, y)
    if gate_dot is not None:
        gate_dot = gate_dot.reshape(gate2.shape)
    out, out_dot = apply_pair(JVP_GATED_RESIDUAL, (h, gate2, y), (h_dot, gate_dot, y_dot), (backend,))
    return out, zeros_if_none(out_dot, out)
