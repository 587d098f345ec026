"""Triton kernels for ``alignment_loss``: the normalised DMD direction of trajectory alignment.

    A_b = Σ_j |x̂_bj − x0_teacher,bj|        S_b = Σ_j (x0_fake,bj − x0_teacher,bj)²
    d = x0_fake − x0_teacher                 (float32 accumulation)

Forward: one pass over x̂, x0_fake and x0_teacher. A grid of (blocks, B) programs, each
reading one BLOCK-wide tile of one sample (one tile, not a loop: see adaptive_weighted_loss),
writes two float32 partial sums per (sample, block) and, when the gradient is needed, d (in
x̂'s dtype). The partials are summed by torch in a fixed order: deterministic, no atomics. The op then forms the per-sample denominator
D_b = max(A_b / N, eps), the loss (1/B)·Σ_b ½·S_b / D_b² and the scale 1/(B·D_b).

g = d / D_b needs D_b, known only once the sample is reduced, so the forward stores d and the
backward writes grad_b,j = scale_b · d_b,j (scale_b = grad_output / (B·D_b)) in one elementwise
pass: the traffic of multiplying a stored gradient by grad_output, and one pass over the inputs.

Inputs are (B, N) with unit stride on N and any row stride; fp16 / bf16 / fp32, one dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meanflow.kernels.launch import cdiv, next_power_of_2, on_tensor_device, split_program_id
from meanflow.kernels.per_sample_scale import per_sample_scale, unit_last

BLOCK, NUM_WARPS = 4096, 8


@triton.jit
def _alignment_loss_fwd_kernel(
    x_ptr, f_ptr, t_ptr, d_ptr, abs_partial_ptr, sq_partial_ptr, s_xb, s_fb, s_tb, n_elem, n_blocks,
    STORE_D: tl.constexpr, BLOCK: tl.constexpr,
):
    block, b = split_program_id(n_blocks)
    j = (block * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = j < n_elem
    x = tl.load(x_ptr + b * s_xb + j, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + b * s_fb + j, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + b * s_tb + j, mask=mask, other=0.0).to(tl.float32)
    d = f - t
    if STORE_D:
        tl.store(d_ptr + b * n_elem + j, d.to(d_ptr.dtype.element_ty), mask=mask)
    tl.store(abs_partial_ptr + b * n_blocks + block, tl.sum(tl.abs(x - t), axis=0))
    tl.store(sq_partial_ptr + b * n_blocks + block, tl.sum(d * d, axis=0))


@on_tensor_device
def alignment_loss_forward(
    x_hat: torch.Tensor, x0_fake: torch.Tensor, x0_teacher: torch.Tensor, need_residual: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A (B,) float32 = Σ|x̂ − x0_teacher|, S (B,) float32 = Σ(x0_fake − x0_teacher)²,
    d = x0_fake − x0_teacher (B, N) contiguous in x̂'s dtype, or None).

    All inputs (B, N), one dtype (fp16 / bf16 / fp32), N >= 1."""
    x_hat, x0_fake, x0_teacher = (unit_last(t) for t in (x_hat, x0_fake, x0_teacher))
    batch, n_elem = x_hat.shape
    block = min(BLOCK, next_power_of_2(n_elem))
    n_blocks = cdiv(n_elem, block)
    abs_partial = torch.empty((batch, n_blocks), device=x_hat.device, dtype=torch.float32)
    sq_partial = torch.empty((batch, n_blocks), device=x_hat.device, dtype=torch.float32)
    d = torch.empty((batch, n_elem), device=x_hat.device, dtype=x_hat.dtype) if need_residual else None
    _alignment_loss_fwd_kernel[(n_blocks * batch,)](
        x_hat, x0_fake, x0_teacher, x_hat if d is None else d, abs_partial, sq_partial,
        x_hat.stride(0), x0_fake.stride(0), x0_teacher.stride(0), n_elem, n_blocks,
        STORE_D=need_residual, BLOCK=block, num_warps=NUM_WARPS,
    )
    return abs_partial.sum(1), sq_partial.sum(1), d


@on_tensor_device
def alignment_loss_backward(residual: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad (B, N) in residual's dtype: scale[b] · residual[b, :] (scale (B,) float32)."""
    return per_sample_scale(residual, scale)
