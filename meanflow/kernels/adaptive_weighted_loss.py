"""Triton kernels for ``adaptive_weighted_loss``: MeanFlow's per-sample squared error in one pass.

    d = u − u_tgt        S_b = Σ_j d_bj²        (float32 accumulation)

Forward: one pass over u and u_tgt. A grid of (blocks, B) programs, each reading one
BLOCK-wide tile of one sample, writes one float32 partial sum per (sample, block) and, when the
gradient is needed, the residual d (in u's dtype). The partials (N / BLOCK per sample) are
summed by torch in a fixed order, so the result is deterministic (no atomics). One tile per
program, not a loop over tiles: a program that stores d and then loads its next tile waits for
each tile in turn (meanflow.kernels: loads first), and at FLUX's (8, 4096·64) a loop gave only
128 programs, too few to keep an H100's memory busy.

The adaptive weight w_b = 1/(S_b + c)^p is known only once the whole sample is reduced, so the
gradient dloss/du = (2/B)·w_b·m_b·d cannot be finished in the same pass without reading u and
u_tgt a second time. The forward therefore stores d, and the backward writes
grad_b,j = scale_b · d_b,j (scale_b = grad_output·(2/B)·w_b·m_b) in one elementwise pass: the
same traffic as multiplying a stored gradient by grad_output, and one pass over the inputs.

Inputs are (B, N) with unit stride on N and any row stride; fp16 / bf16 / fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meanflow.kernels.launch import cdiv, next_power_of_2, on_tensor_device, split_program_id
from meanflow.kernels.per_sample_scale import per_sample_scale, unit_last

BLOCK, NUM_WARPS = 4096, 8


@triton.jit
def _adaptive_weighted_loss_fwd_kernel(
    u_ptr, t_ptr, d_ptr, partial_ptr, s_ub, s_tb, n_elem, n_blocks,
    STORE_D: tl.constexpr, BLOCK: tl.constexpr,
):
    block, b = split_program_id(n_blocks)
    j = (block * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = j < n_elem
    u = tl.load(u_ptr + b * s_ub + j, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + b * s_tb + j, mask=mask, other=0.0).to(tl.float32)
    d = u - t
    if STORE_D:
        tl.store(d_ptr + b * n_elem + j, d.to(d_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + b * n_blocks + block, tl.sum(d * d, axis=0))


@on_tensor_device
def adaptive_weighted_loss_forward(
    u: torch.Tensor, u_tgt: torch.Tensor, need_residual: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(S (B,) float32 = Σ_j (u − u_tgt)², d = u − u_tgt (B, N) contiguous in u's dtype or None).

    u, u_tgt (B, N), one dtype (fp16 / bf16 / fp32), N >= 1."""
    u, u_tgt = unit_last(u), unit_last(u_tgt)
    batch, n_elem = u.shape
    block = min(BLOCK, next_power_of_2(n_elem))
    n_blocks = cdiv(n_elem, block)
    partial = torch.empty((batch, n_blocks), device=u.device, dtype=torch.float32)
    d = torch.empty((batch, n_elem), device=u.device, dtype=u.dtype) if need_residual else None
    _adaptive_weighted_loss_fwd_kernel[(n_blocks * batch,)](
        u, u_tgt, u if d is None else d, partial, u.stride(0), u_tgt.stride(0), n_elem, n_blocks,
        STORE_D=need_residual, BLOCK=block, num_warps=NUM_WARPS,
    )
    return partial.sum(1), d


@on_tensor_device
def adaptive_weighted_loss_backward(residual: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad (B, N) in residual's dtype: scale[b] · residual[b, :] (scale (B,) float32)."""
    return per_sample_scale(residual, scale)
