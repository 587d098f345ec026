"""``jvp_rms_norm``: FLUX's per-head RMS norm with its tangent fused into the same pass.

    r = rsqrt(mean(x²) + eps)      y = x·r·w      ẏ = w·(ẋ·r − x·r³·mean(x·ẋ)) + x·r·ẇ

over the last dimension of x (any leading dims), statistics in float32 (float64 for float64
inputs). A drop-in for diffusers' ``RMSNorm`` (FLUX's q/k norm) with an elementwise affine
weight, and for ``torch.nn.RMSNorm`` / ``F.rms_norm(x, (D,), weight, eps)`` where x and the
weight share a dtype: the same values up to one rounding (they round x·r to the input dtype
before the weight product; we round once). The output dtype is ``promote_types(x, weight)`` (x's
without a weight), as diffusers gives for a float32 weight or one of x's dtype; torch 2.13's
``F.rms_norm`` returns x's dtype whatever the weight's, so with mixed dtypes cast y (or the
weight) to match it.

Two forms, both on ``meanflow.ops.pair.apply_pair``:

- ``jvp_rms_norm(x, weight, eps)``: works under ``torch.func.jvp`` and
  ``torch.autograd.forward_ad`` (a tangent of x and, if the weight is dual, of the weight);
- ``jvp_rms_norm_pair(x, x_dot, weight, eps, weight_dot=None) -> (y, y_dot)``.

y is differentiable to x and the weight: the backward saves nothing but the inputs and
recomputes the row statistics (a Triton kernel; the plain-torch vector-Jacobian product on the
reference backend and inside ``torch.func`` transforms). y_dot carries no autograd history.
"""
from __future__ import annotations

import math

import torch

from meanflow.ops._checks import (TRITON_DTYPES, check_number, check_same_device, check_tangent, check_tensor,
                                  unit_last_stride)
from meanflow.ops.dispatch import implementation, resolve_backend
from meanflow.ops.pair import KERNEL_OP, PairOp, apply_pair, backward_backend

TRITON_MAX_DIM = 8192


def _forward(inputs, tangents, options):
    x, weight = inputs
    x_dot, weight_dot = tangents
    eps, backend = options
    y, y_dot = implementation("jvp_rms_norm", backend).jvp_rms_norm_forward(x, weight, eps, x_dot, weight_dot)
    return y, y_dot, ()


def _backward(inputs, y, extras, options, grad_y, needs_input_grad):
    x, weight = inputs
    eps, backend = options
    return implementation("jvp_rms_norm", backward_backend(backend)).jvp_rms_norm_backward(
        grad_y, x, weight, eps, needs_input_grad[0], needs_input_grad[1])


# Inputs (x (R, D) with unit last stride, weight (D,) or None); options (eps, backend).
JVP_RMS_NORM = PairOp("jvp_rms_norm", _forward, _backward, input_names=("x", "weight"),
                      prepare=unit_last_stride, **KERNEL_OP)


# --------------------------------------------------------------------------------------------
# Validation (shared with jvp_layer_norm_modulate; the tensor checks are meanflow.ops._checks)
# --------------------------------------------------------------------------------------------

def check_eps(eps) -> float:
    return check_number("eps", eps, positive=False)


def check_backend(device: torch.device, empty: bool, dtypes: dict[str, torch.dtype], dim: int) -> str:
    """The backend for these inputs; refuses what the Triton kernels cannot take."""
    backend = "reference" if empty else resolve_backend(device)
    if backend == "triton":
        for name, dtype in dtypes.items():
            if dtype not in TRITON_DTYPES:
                raise ValueError(f"{name} dtype {dtype} is not supported by the Triton backend "
                                 "(float16, bfloat16, float32); use MEANFLOW_BACKEND=reference")
        if dim > TRITON_MAX_DIM:
            raise ValueError(f"the Triton backend normalizes rows of up to {TRITON_MAX_DIM} elements, "
                             f"got {dim}; "
                             "use MEANFLOW_BACKEND=reference")
    return backend


def _validate(x, weight, eps) -> tuple[str, float]:
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a last dimension of at least 1 element, got shape {tuple(x.shape)}")
    if weight is not None:
        check_tensor("weight", weight)
        if weight.shape != (x.shape[-1],):
            raise ValueError(f"weight must have shape ({x.shape[-1]},) (x's last dim), "
                             f"got {tuple(weight.shape)}")
        check_same_device("weight", weight, "x", x)
    if eps is None:  # torch's default: the epsilon of the float32 (float64) it computes in, not of x's dtype
        eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
    eps = check_eps(eps)
    dtypes = {"x": x.dtype} if weight is None else {"x": x.dtype, "weight": weight.dtype}
    return check_backend(x.device, x.numel() == 0, dtypes, x.shape[-1]), eps


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """(..., D) -> (R, D) with unit last stride: a view whenever the layout allows."""
    return None if t is None else unit_last_stride(t.reshape(math.prod(t.shape[:-1]), t.shape[-1]))


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------

def jvp_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float | None = 1e-6,
) -> torch.Tensor:
    """RMS norm over the last dim that supports forward-mode AD with a fused tangent.

    Args:
        x: (..., D); float16, bfloat16, float32 (float64 on the reference backend).
        weight: (D,) elementwise affine weight, or None; any float dtype, x's device.
        eps: added to the mean square (FLUX: 1e-6); None means the epsilon of the dtype the
            statistics are computed in (float32's for 16-bit x, float64's for float64), as
            ``torch.nn.RMSNorm`` / ``F.rms_norm`` compute it.

    Returns:
        (..., D) in ``promote_types(x.dtype, weight.dtype)`` (x.dtype without a weight). Under
        ``torch.func.jvp`` or forward AD, its tangent (from the tangents of x and of the weight)
        is computed in the same kernel and carries no ``grad_fn``.

    Raises:
        ValueError: naming the argument, for anything unsupported or inconsistent.
    """
    backend, eps = _validate(x, weight, eps)
    shape = x.shape
    w = unit_last_stride(weight)
    y, _ = apply_pair(JVP_RMS_NORM, (_rows(x), w), None, (eps, backend))
    return y.reshape(shape)


def jvp_rms_norm_pair(
    x: torch.Tensor,
    x_dot: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    eps: float | None = 1e-6,
    weight_dot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit (primal, tangent) form for the pair-mode forward of a network.

    Args:
        x, weight, eps: as ``jvp_rms_norm``.
        x_dot: x's tangent, shaped and typed like x, or None (zero, no work).
        weight_dot: the weight's tangent, like the weight, or None (the usual case).

    Returns:
        y: as ``jvp_rms_norm``, differentiable to x and the weight.
        y_dot: the same shape and dtype, detached (no ``grad_fn``); zeros when both tangents are None.
    """
    backend, eps = _validate(x, weight, eps)
    check_tangent("x_dot", x_dot, x, "x")
    check_tangent("weight_dot", weight_dot, weight, "weight")
    shape = x.shape
    y, y_dot = apply_pair(JVP_RMS_NORM, (_rows(x), unit_last_stride(weight)),
                          (_rows(x_dot), unit_last_stride(weight_dot)), (eps, backend))
    y = y.reshape(shape)
    return y, torch.zeros_like(y) if y_dot is None else y_dot.reshape(shape)
