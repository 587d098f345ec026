"""Plain-torch reference for ``adaptive_weighted_loss``: MeanFlow's per-sample squared error.

    d = u − u_tgt        S_b = Σ_j d_bj²

Same launchers as ``meanflow.kernels.adaptive_weighted_loss``. Computed in float32 for 16-bit
inputs (float64 for float64); d is rounded once to u's dtype, S stays in the compute dtype.
"""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def adaptive_weighted_loss_forward(
    u: torch.Tensor, u_tgt: torch.Tensor, need_residual: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(S (B,) in the compute dtype, d = u − u_tgt (B, N) in u's dtype or None); u, u_tgt (B, N)."""
    dtype = _compute_dtype(u.dtype)
    d = u.to(dtype) - u_tgt.to(dtype)
    return d.square().sum(1), (d.to(u.dtype) if need_residual else None)


def adaptive_weighted_loss_backward(residual: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad (B, N) in residual's dtype: scale[b] · residual[b, :]."""
    dtype = _compute_dtype(residual.dtype)
    return (scale.to(dtype)[:, None] * residual.to(dtype)).to(residual.dtype)
