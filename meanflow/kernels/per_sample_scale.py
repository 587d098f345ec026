"""Triton kernel shared by the loss kernels' backward: grad[b, j] = scale[b] · residual[b, j].

The losses (``adaptive_weighted_loss``, ``alignment_loss``) store a residual in their forward
and, in backward, scale each sample's row by a per-sample float32 factor that already folds in
grad_output: one elementwise pass, accumulated in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meanflow.kernels.launch import cdiv, next_power_of_2, split_program_id

BLOCK, NUM_WARPS = 1024, 4


@triton.jit
def _per_sample_scale_kernel(d_ptr, scale_ptr, grad_ptr, n_elem, BLOCK: tl.constexpr):
    block, b = split_program_id(tl.cdiv(n_elem, BLOCK))
    j = (block * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = j < n_elem
    scale = tl.load(scale_ptr + b)
    d = tl.load(d_ptr + b * n_elem + j, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_ptr + b * n_elem + j, (scale * d).to(grad_ptr.dtype.element_ty), mask=mask)


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself if its last dimension has unit stride, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def per_sample_scale(residual: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad (B, N) in residual's dtype: scale[b] · residual[b, :].

    Args:
        residual: (B, N) contiguous, fp16 / bf16 / fp32.
        scale: (B,) any float dtype (read as float32).
    """
    batch, n_elem = residual.shape
    grad = torch.empty_like(residual)
    block = min(BLOCK, next_power_of_2(n_elem))
    _per_sample_scale_kernel[(cdiv(n_elem, block) * batch,)](
        residual, scale.to(torch.float32).contiguous(), grad, n_elem, BLOCK=block, num_warps=NUM_WARPS,
    )
    return grad
