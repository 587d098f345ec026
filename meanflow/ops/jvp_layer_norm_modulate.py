"""``jvp_layer_norm_modulate``: FLUX's adaptive LayerNorm core with its tangent fused in.

    x̂ = (x − mean(x))/σ,  σ = sqrt(var(x) + eps)         y = x̂·(1 + scale) + shift
    ẏ = (ẋ − mean(ẋ) − x̂·mean(x̂·ẋ))/σ·(1 + scale) + x̂·ṡcale + ṡhift

LayerNorm over the last dim without affine (FLUX: eps 1e-6), statistics in float32 (float64
for float64 inputs), x (B, N, D), scale and shift (B, D) or (B, 1, D) broadcast over the
tokens. That is ``norm(x) * (1 + scale[:, None]) + shift[:, None]`` of diffusers'
``AdaLayerNormZero`` (and ``AdaLayerNormZeroSingle``, ``AdaLayerNormContinuous``) with the
tangents of x, scale and shift all supported (scale and shift depend on the times t and r,
so theirs are not zero in MeanFlow). The output dtype is ``promote_types(x, scale, shift)``.

Two forms, both on ``meanflow.ops.pair.apply_pair``:

- ``jvp_layer_norm_modulate(x, scale, shift, eps=1e-6)``: under ``torch.func.jvp`` / forward AD;
- ``jvp_layer_norm_modulate_pair(x, x_dot, scale, scale_dot, shift, shift_dot, eps=1e-6)``.

y is differentiable to x, scale and shift: the backward saves nothing but the inputs and
recomputes the row statistics (a Triton kernel; the plain-torch vector-Jacobian product on the
reference backend and inside ``torch.func`` transforms). y_dot carries no autograd history.
"""
from __future__ import annotations

import torch

from meanflow.ops._checks import check_same_device, check_tangent, check_tensor, unit_last_stride
from meanflow.ops.dispatch import implementation
from meanflow.ops.jvp_rms_norm import check_backend, check_eps
from meanflow.ops.pair import KERNEL_OP, PairOp, apply_pair, backward_backend


def _forward(inputs, tangents, options):
    x, scale, shift = inputs
    x_dot, scale_dot, shift_dot = tangents
    eps, backend = options
    y, y_dot = implementation("jvp_layer_norm_modulate", backend).jvp_layer_norm_modulate_forward(
        x, scale, shift, x_dot, scale_dot, shift_dot, eps)
    return y, y_dot, ()


def _backward(inputs, y, extras, options, grad_y, needs_input_grad):
    eps, backend = options
    impl = implementation("jvp_layer_norm_modulate", backward_backend(backend))
    return impl.jvp_layer_norm_modulate_backward(grad_y, *inputs, eps, tuple(needs_input_grad))


# Inputs (x (B, N, D), scale (B, D), shift (B, D)), unit last strides; options (eps, backend).
JVP_LAYER_NORM_MODULATE = PairOp("jvp_layer_norm_modulate", _forward, _backward,
                                 input_names=("x", "scale", "shift"), prepare=unit_last_stride,
                                 **KERNEL_OP)


def _validate(x, scale, shift, eps) -> tuple[str, float]:
    check_tensor("x", x)
    if x.dim() != 3 or x.shape[-1] == 0:
        raise ValueError(f"x must be (B, N, D) with D >= 1, got shape {tuple(x.shape)}")
    batch, _, dim = x.shape
    for name, t in (("scale", scale), ("shift", shift)):
        check_tensor(name, t)
        if tuple(t.shape) not in ((batch, dim), (batch, 1, dim)):
            raise ValueError(f"{name} must be (B, D) = {(batch, dim)} or (B, 1, D), got {tuple(t.shape)}")
        check_same_device(name, t, "x", x)
    eps = check_eps(eps)
    dtypes = {"x": x.dtype, "scale": scale.dtype, "shift": shift.dtype}
    return check_backend(x.device, x.numel() == 0, dtypes, dim), eps


def _per_batch(t: torch.Tensor | None) -> torch.Tensor | None:
    """(B, 1, D) -> (B, D) view; unit last stride."""
    if t is None:
        return None
    return unit_last_stride(t.squeeze(1) if t.dim() == 3 else t)


def jvp_layer_norm_modulate(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """LayerNorm(x)·(1 + scale) + shift that supports forward-mode AD with a fused tangent.

    Args:
        x: (B, N, D); float16, bfloat16, float32 (float64 on the reference backend).
        scale, shift: (B, D) or (B, 1, D), x's device, any of those dtypes.
        eps: added to the variance (FLUX: 1e-6).

    Returns:
        (B, N, D) in ``promote_types(x, scale, shift)``. Under ``torch.func.jvp`` or forward AD,
        its tangent (from the tangents of x, scale and shift, whichever are dual) is computed in
        the same kernel and carries no ``grad_fn``.

    Raises:
        ValueError: naming the argument, for anything unsupported or inconsistent.
    """
    backend, eps = _validate(x, scale, shift, eps)
    inputs = (unit_last_stride(x), _per_batch(scale), _per_batch(shift))
    y, _ = apply_pair(JVP_LAYER_NORM_MODULATE, inputs, None, (eps, backend))
    return y


def jvp_layer_norm_modulate_pair(
    x: torch.Tensor,
    x_dot: torch.Tensor | None,
    scale: torch.Tensor,
    scale_dot: torch.Tensor | None,
    shift: torch.Tensor,
    shift_dot: torch.Tensor | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit (primal, tangent) form for the pair-mode forward of a network.

    Args:
        x, scale, shift, eps: as ``jvp_layer_norm_modulate``.
        x_dot, scale_dot, shift_dot: tangents shaped and typed like their primals, or None
            (zero, no work).

    Returns:
        y: as ``jvp_layer_norm_modulate``, differentiable to x, scale and shift.
        y_dot: the same shape and dtype, detached (no ``grad_fn``); zeros when every tangent is None.
    """
    for name, t in (("x", x), ("scale", scale), ("shift", shift)):
        check_tensor(name, t)
    tangents = (("x_dot", x_dot, x), ("scale_dot", scale_dot, scale), ("shift_dot", shift_dot, shift))
    for name, tangent, primal in tangents:
        check_tangent(name, tangent, primal, name.removesuffix("_dot"))
    backend, eps = _validate(x, scale, shift, eps)
    y, y_dot = apply_pair(JVP_LAYER_NORM_MODULATE,
                          (unit_last_stride(x), _per_batch(scale), _per_batch(shift)),
                          (unit_last_stride(x_dot), _per_batch(scale_dot), _per_batch(shift_dot)),
                          (eps, backend))
    return y, torch.zeros_like(y) if y_dot is None else y_dot
