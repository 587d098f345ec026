"""Plain-torch reference for ``jvp_layer_norm_modulate``: the test oracle and the CPU path.

The core of FLUX's AdaLayerNormZero / AdaLayerNormContinuous: a LayerNorm over the last
dimension without affine, then the adaptive modulation, per batch element b and token n:

    μ = mean(x)      σ = sqrt(mean((x − μ)²) + eps)      x̂ = (x − μ)/σ
    y = x̂·(1 + scale_b) + shift_b
    ẏ = LN'(x)[ẋ]·(1 + scale_b) + x̂·ṡcale_b + ṡhift_b,   LN'(x)[ẋ] = (ẋ − mean(ẋ) − x̂·mean(x̂·ẋ))/σ

x (B, N, D); scale, shift and their tangents (B, D), broadcast over the N tokens. Statistics and
products run in float32 for 16-bit inputs and in float64 for float64 inputs; the result is
rounded once to ``promote_types(x, scale, shift)`` (FLUX rounds LN(x) to bf16 first, then
modulates in bf16: twice more).
"""
from __future__ import annotations

import torch

from meanflow.reference.jvp_rms_norm import compute_dtype


def output_dtype(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, scale.dtype), shift.dtype)


def shifted_mean(x: torch.Tensor) -> torch.Tensor:
    """mean(x) over the last dim as x₀ + mean(x − x₀), x₀ the row's first element (keepdim): the
    sum then rounds at the row's spread, not its offset, and a constant row's mean is exactly
    its value, so it normalizes to exactly 0 (a plain mean left c·1e-7-sized residuals that
    1/sqrt(eps) amplified to c·1e-4). The kernels compute it the same way."""
    first = x[..., :1].detach()  # the identity holds for any shift: no gradient needed through it
    return first + (x - first).mean(-1, keepdim=True)


def _normalize(x: torch.Tensor, eps: float, ct: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂, 1/σ) in the compute dtype."""
    xf = x.to(ct)
    centered = xf - shifted_mean(xf)
    rstd = torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    return centered * rstd, rstd


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                        eps: float) -> torch.Tensor:
    """The primal, differentiable (the backward recomputes it). scale, shift: (B, D)."""
    ct = compute_dtype(x.dtype, scale.dtype, shift.dtype)
    x_hat, _ = _normalize(x, eps, ct)
    y = x_hat * (1 + scale.to(ct)).unsqueeze(-2) + shift.to(ct).unsqueeze(-2)
    return y.to(output_dtype(x, scale, shift))


def jvp_layer_norm_modulate_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    x_dot: torch.Tensor | None,
    scale_dot: torch.Tensor | None,
    shift_dot: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Primal and tangent; no autograd.

    Args:
        x: (B, N, D) float; scale, shift: (B, D); x_dot, scale_dot, shift_dot: like their
            primals, or None (zero, no work); eps: added to the variance.

    Returns:
        y (B, N, D) in ``output_dtype``; y_dot the same, or None when every tangent is None.
    """
    ct = compute_dtype(x.dtype, scale.dtype, shift.dtype)
    out_dtype = output_dtype(x, scale, shift)
    x_hat, rstd = _normalize(x, eps, ct)
    gain = (1 + scale.to(ct)).unsqueeze(-2)
    y = (x_hat * gain + shift.to(ct).unsqueeze(-2)).to(out_dtype)
    if x_dot is None and scale_dot is None and shift_dot is None:
        return y, None
    y_dot = torch.zeros_like(x_hat)
    if x_dot is not None:
        xd = x_dot.to(ct)
        lin = (xd - xd.mean(-1, keepdim=True) - x_hat * (x_hat * xd).mean(-1, keepdim=True)) * rstd
        y_dot = lin * gain
    if scale_dot is not None:
        y_dot = y_dot + x_hat * scale_dot.to(ct).unsqueeze(-2)
    if shift_dot is not None:
        y_dot = y_dot + shift_dot.to(ct).unsqueeze(-2)
    return y, y_dot.to(out_dtype)


def jvp_layer_norm_modulate_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    needs_input_grad: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``layer_norm_modulate`` from grad_y: the vector-Jacobian product of the
    recomputed primal (``torch.func.vjp``, so it also works inside functorch transforms).

    Returns:
        (dx, dscale, dshift) shaped like (x, scale, shift); None where not needed.
    """
    wanted = [i for i, need in enumerate(needs_input_grad) if need]
    if not wanted:
        return None, None, None
    inputs = (x, scale, shift)

    def of_wanted(*tensors):
        args = list(inputs)
        for i, t in zip(wanted, tensors):
            args[i] = t
        return layer_norm_modulate(*args, eps)

    _, vjp = torch.func.vjp(of_wanted, *(inputs[i] for i in wanted))
    grads = dict(zip(wanted, vjp(grad_y)))
    return tuple(grads.get(i) for i in range(3))
