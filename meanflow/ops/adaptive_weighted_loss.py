"""``adaptive_weighted_loss``: MeanFlow's adaptively weighted squared error (DESIGN §2 "Loss").

    L_b = Σ_j (u_bj − sg(u_tgt)_bj)²       w_b = 1 / sg(L_b + c)^p
    loss = (1/B) · Σ_b m_b · w_b · L_b      (m_b = weights[b], 1 when weights is None)

One fused pass over u and u_tgt per sample (Triton, float32 accumulation, deterministic
two-stage reduction) gives L and stores the residual u − u_tgt; the backward writes
dloss/du = grad_output · (2/B)·m_b·w_b·(u − u_tgt) in one elementwise pass. u_tgt and weights
get no gradient (u_tgt sits under the stop-gradient; weights are constants). Note the mean is
over all B samples, also where a 0/1 mask zeroes some of them.

Under torch.func transforms (grad, vjp, jvp, vmap) and on a dual u (forward AD), the same
formula runs as plain torch ops, which those transforms differentiate themselves.
"""
from __future__ import annotations

import torch

from meanflow.ops._checks import (FLOAT_DTYPES, check_like, check_number, check_same_device, check_tensor,
                                  check_triton_dtype)
from meanflow.ops.dispatch import implementation, resolve_backend
from meanflow.ops.pair import refuse_double_backward, under_transform

STEM = "adaptive_weighted_loss"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class AdaptiveWeightedLoss(torch.autograd.Function):
    """(u (B, N), u_tgt (B, N), weights (B,) or None, p, c, backend, need_grad) -> (loss, L (B,))."""

    @staticmethod
    def forward(ctx, u, u_tgt, weights, p, c, backend, need_grad):
        impl = implementation(STEM, backend)
        sums, residual = impl.adaptive_weighted_loss_forward(u, u_tgt, need_grad)
        sums = sums.to(_compute_dtype(u.dtype))
        batch = sums.shape[0]
        w = (sums + c).pow(-p)
        if weights is not None:
            w = w * weights.to(sums.dtype)
        loss = (w * sums).sum() / batch
        ctx.backend = backend
        ctx.save_for_backward(residual, w * (2.0 / batch) if need_grad else None)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, grad_sums):
        residual, row_scale = ctx.saved_tensors
        # The residual was saved without its graph: du would carry none.
        refuse_double_backward(STEM, grad_loss, residual, row_scale)
        grad_u = None
        if ctx.needs_input_grad[0] and residual is not None:
            grad_u = implementation(STEM, ctx.backend).adaptive_weighted_loss_backward(
                residual, row_scale * grad_loss.to(row_scale.dtype))
        return grad_u, None, None, None, None, None, None


# The Function as Python runs it, never traced by Dynamo (under torch.compile the formula runs
# instead, ``under_transform``; after a graph break the frames below would be compiled one by one).
_apply_untraced = torch.compiler.disable(AdaptiveWeightedLoss.apply)


def _formula(u, u_tgt, weights, p, c):
    """The loss as plain torch ops, with the Function's numerics (compute dtype), for transforms."""
    dtype = _compute_dtype(u.dtype)
    sums = (u.to(dtype) - u_tgt.to(dtype)).square().sum(1)
    w = (sums.detach() + c).pow(-p)
    if weights is not None:
        w = w * weights.to(dtype)
    return (w * sums).sum() / sums.shape[0], sums.detach()


def _validate(u, u_tgt, weights, p, c) -> str:
    check_tensor("u", u, FLOAT_DTYPES)
    check_tensor("u_tgt", u_tgt, FLOAT_DTYPES)
    if u.dim() < 1 or u.shape[0] == 0:
        raise ValueError(f"u must be (B, ...) with B >= 1, got shape {tuple(u.shape)}")
    if u_tgt.shape != u.shape:
        raise ValueError(f"u_tgt must have u's shape {tuple(u.shape)}, got {tuple(u_tgt.shape)}")
    check_like("u_tgt", u_tgt, "u", u)
    if weights is not None:
        check_tensor("weights", weights, FLOAT_DTYPES)
        if weights.shape != (u.shape[0],):
            raise ValueError(f"weights must be (B,) = ({u.shape[0]},), got shape {tuple(weights.shape)}")
        check_same_device("weights", weights, "u", u)
    check_number("p", p, positive=False)
    check_number("c", c, positive=True)
    backend = "reference" if u.numel() == 0 else resolve_backend(u.device)
    if backend == "triton":
        check_triton_dtype(STEM, "u", u)
    return backend


def adaptive_weighted_loss(
    u: torch.Tensor,
    u_tgt: torch.Tensor,
    weights: torch.Tensor | None = None,
    p: float = 1.0,
    c: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MeanFlow's loss mean_b(m_b · L_b / sg(L_b + c)^p), L_b = Σ (u − sg(u_tgt))² per sample.

    Args:
        u: (B, ...) the student's prediction; float16 / bfloat16 / float32 (float64 on the
            reference backend).
        u_tgt: the target, u's shape, dtype and device; no gradient flows into it.
        weights: optional (B,) per-sample weights or 0/1 mask (any float dtype), no gradient.
        p, c: the adaptive weight's power (finite, >= 0) and offset (finite, > 0); p = 0 is a plain
            sum of squares.

    Returns:
        (loss, L): the scalar loss and the per-sample L (B,) for logging (no gradient), both
        float32 (float64 for float64 input).
    """
    backend = _validate(u, u_tgt, weights, p, c)
    u2 = u.reshape(u.shape[0], -1)
    u_tgt2, weights = u_tgt.detach().reshape(u2.shape), None if weights is None else weights.detach()
    if under_transform(u):
        return _formula(u2, u_tgt2, weights, float(p), float(c))
    need_grad = torch.is_grad_enabled() and u.requires_grad
    return _apply_untraced(u2, u_tgt2, weights, float(p), float(c), backend, need_grad)
