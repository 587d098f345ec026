"""Plain-torch reference for ``alignment_loss``: the sums behind the normalised DMD direction.

    A_b = Σ_j |x̂_bj − x0_teacher,bj|     S_b = Σ_j (x0_fake,bj − x0_teacher,bj)²
    d = x0_fake − x0_teacher

Same launchers as ``meanflow.kernels.alignment_loss``. Computed in float32 for 16-bit inputs
(float64 for float64); d is rounded once to x̂'s dtype, A and S stay in the compute dtype.
"""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def alignment_loss_forward(
    x_hat: torch.Tensor, x0_fake: torch.Tensor, x0_teacher: torch.Tensor, need_residual: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A (B,), S (B,) in the compute dtype, d (B, N) in x̂'s dtype or None); inputs (B, N)."""
    dtype = _compute_dtype(x_hat.dtype)
    teacher = x0_teacher.to(dtype)
    d = x0_fake.to(dtype) - teacher
    return ((x_hat.to(dtype) - teacher).abs().sum(1), d.square().sum(1),
            d.to(x_hat.dtype) if need_residual else None)


def alignment_loss_backward(residual: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad (B, N) in residual's dtype: scale[b] · residual[b, :]."""
    dtype = _compute_dtype(residual.dtype)
    return (scale.to(dtype)[:, None] * residual.to(dtype)).to(residual.dtype)
