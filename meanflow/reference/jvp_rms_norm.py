"""Plain-torch reference for ``jvp_rms_norm``: the test oracle and the CPU path.

FLUX's per-head query / key norm (``torch.nn.RMSNorm`` in current diffusers, diffusers'
``RMSNorm`` before; both compute the mean square in float32), over the last dimension of x,
with r the reciprocal root mean square and tangents written with a dot:

    r = rsqrt(mean(x²) + eps)                 y = x·r·w
    ẏ = w·(ẋ·r − x·r³·mean(x·ẋ)) + x·r·ẇ

Statistics and products run in float32 for 16-bit inputs and in float64 for float64 inputs
(diffusers would take the mean square of a float64 input in float32; the oracle keeps float64),
and the result is rounded once to the output dtype ``promote_types(x.dtype, weight.dtype)``
(x.dtype without a weight), as ``torch.nn.RMSNorm`` gives. Rows are independent: any leading
dims, rows of length D.
"""
from __future__ import annotations

import torch


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 for 16-bit and float32 inputs, float64 if any input is float64."""
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def output_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    return x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The primal y = x·rsqrt(mean(x²) + eps)·w, differentiable (the backward recomputes it)."""
    ct = compute_dtype(x.dtype, *(() if weight is None else (weight.dtype,)))
    xf = x.to(ct)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(ct)
    return y.to(output_dtype(x, weight))


def jvp_rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    x_dot: torch.Tensor | None = None,
    weight_dot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Primal and tangent of the RMS norm over the last dim; no autograd.

    Args:
        x: (..., D) float; weight: (D,) or None; eps: added to the mean square.
        x_dot: like x, or None (zero); weight_dot: like weight, or None (zero).

    Returns:
        y (..., D) in ``output_dtype``; y_dot the same, or None when both tangents are None.
    """
    ct = compute_dtype(x.dtype, *(() if weight is None else (weight.dtype,)))
    out_dtype = output_dtype(x, weight)
    xf = x.to(ct)
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    normed = xf * r
    w = None if weight is None else weight.to(ct)
    y = normed if w is None else normed * w
    if x_dot is None and weight_dot is None:
        return y.to(out_dtype), None
    y_dot = torch.zeros_like(xf)
    if x_dot is not None:
        xd = x_dot.to(ct)
        n_dot = (xd - xf * (r * r * (xf * xd).mean(-1, keepdim=True))) * r
        y_dot = n_dot if w is None else n_dot * w
    if weight_dot is not None:
        y_dot = y_dot + normed * weight_dot.to(ct)
    return y.to(out_dtype), y_dot.to(out_dtype)


def jvp_rms_norm_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    needs_x_grad: bool = True,
    needs_weight_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``rms_norm(x, weight, eps)`` from grad_y: the vector-Jacobian product of the
    recomputed primal (``torch.func.vjp``, so it also works inside functorch transforms).

    Returns:
        dx like x, or None; dw like the weight, or None (also when there is no weight).
    """
    needs_dw = needs_weight_grad and weight is not None
    if not (needs_x_grad or needs_dw):
        return None, None
    if needs_x_grad and needs_dw:
        _, vjp = torch.func.vjp(lambda x, w: rms_norm(x, w, eps), x, weight)
        return vjp(grad_y)
    if needs_x_grad:
        _, vjp = torch.func.vjp(lambda x: rms_norm(x, weight, eps), x)
        return vjp(grad_y)[0], None
    _, vjp = torch.func.vjp(lambda w: rms_norm(x, w, eps), weight)
    return None, vjp(grad_y)[0]
