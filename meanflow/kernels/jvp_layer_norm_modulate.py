"""Triton kernel for ``jvp_layer_norm_modulate``: LayerNorm + modulation and its tangent in one pass.

Math, per row (token n of batch element b) of D elements, all in float32:

    μ = mean(x)      rstd = rsqrt(mean((x − μ)²) + eps)      x̂ = (x − μ)·rstd
    y = x̂·(1 + s_b) + h_b
    ẏ = (ẋ − mean(ẋ) − x̂·mean(x̂·ẋ))·rstd·(1 + s_b) + x̂·ṡ_b + ḣ_b

with s = scale, h = shift (per batch element, broadcast over the tokens). Each program
normalizes a (BLOCK_M, BLOCK_D) tile of whole rows (BLOCK_D the next power of two >= D,
masked past D; BLOCK_M = TILE // BLOCK_D, at least one), so the statistics come from registers
and every element is read once and written once. The variance is the centred two-pass form
(the mean first, shifted by the row's first element, then mean((x − μ)²)) on the row held in
registers. The primal-only and tangent variants are one kernel with constexpr flags
(HAS_X_DOT, HAS_SCALE_DOT, HAS_SHIFT_DOT).

Backward, from x, scale and the output gradient g (nothing saved but the inputs):

    ĝ = g·(1 + s_b)     dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))
    dscale_b = Σ_n g·x̂      dshift_b = Σ_n g

Programs (p, b) walk the token blocks of batch element b (so the scale row is loaded once) and
write one float32 partial row of dscale / dshift each; the launcher sums those.

x and ẋ: any (batch, token) strides, unit last stride; scale, shift and their tangents:
(B, D) with any batch stride. y and ẏ are written contiguous (B, N, D) in their own dtype
(``promote_types(x, scale, shift)``). Launchers take tensors and return tensors; no autograd.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meanflow.kernels.jvp_rms_norm import (ROW_TILES, reduction_programs, row_block, row_configs, row_pruner,
                                           rows_per_program, sum3)
from meanflow.kernels.launch import cdiv, on_tensor_device, split_program_id


@triton.jit
def _load_per_batch(ptr, batch, stride_b, cols, mask):
    """(BLOCK_M, BLOCK_D) float32 tile of a (B, D) tensor, row i read from batch element batch[i]."""
    return tl.load(ptr + batch[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _centre(x, first, mask, n_cols):
    """x − mean(x) per row (zero outside ``mask``), the mean taken as x₀ + mean(x − x₀) with x₀
    the row's first element (``first``, (BLOCK_M,)): as the reference's ``shifted_mean``, so
    a constant row centres to exactly 0 and the sum rounds at the row's spread."""
    mean = first + tl.sum(tl.where(mask, x - first[:, None], 0.0), axis=1) / n_cols
    return tl.where(mask, x - mean[:, None], 0.0)


@triton.autotune(configs=row_configs(), key=["BLOCK_D", "HAS_X_DOT", "HAS_SCALE_DOT", "HAS_SHIFT_DOT"],
                 prune_configs_by={"early_config_prune": row_pruner})
@triton.jit
def _jvp_layer_norm_modulate_kernel(
    X, X_DOT, SCALE, SCALE_DOT, SHIFT, SHIFT_DOT, Y, Y_DOT,
    n_rows, n_tokens, n_cols,
    stride_x_b, stride_x_n, stride_x_dot_b, stride_x_dot_n,
    stride_scale_b, stride_scale_dot_b, stride_shift_b, stride_shift_dot_b,
    eps,
    HAS_X_DOT: tl.constexpr, HAS_SCALE_DOT: tl.constexpr, HAS_SHIFT_DOT: tl.constexpr,
    BLOCK_D: tl.constexpr, TILE: tl.constexpr,
):
    BLOCK_M: tl.constexpr = TILE // BLOCK_D if TILE > BLOCK_D else 1
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    batch = rows // n_tokens
    token = rows % n_tokens
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]

    # The streamed rows x, ẋ are loaded first (meanflow.kernels). The per-batch rows (L2-resident,
    # read by every token) are loaded where they are used, the tangents' after y's store: loading
    # them all first costs ~20 registers, 3 CTAs per SM -> 2 at the default tile.
    x = tl.load(X + (batch * stride_x_b + token * stride_x_n)[:, None] + cols[None, :], mask=mask, other=0.0)
    if HAS_X_DOT:
        x_dot_rows = X_DOT + (batch * stride_x_dot_b + token * stride_x_dot_n)[:, None]
        x_dot = tl.load(x_dot_rows + cols[None, :], mask=mask, other=0.0)

    x = x.to(tl.float32)
    first = tl.load(X + batch * stride_x_b + token * stride_x_n, mask=rows < n_rows, other=0.0)
    centred = _centre(x, first.to(tl.float32), mask, n_cols)
    if HAS_X_DOT:
        # The tangent's sums share the variance's reduction (one round across the warps, not
        # three): mean(x̂·ẋ) = rstd·mean((x − μ)·ẋ).
        x_dot = x_dot.to(tl.float32)
        sum_sq, sum_dot, sum_cross = tl.reduce((centred * centred, x_dot, centred * x_dot), 1, sum3)
    else:
        sum_sq = tl.sum(centred * centred, axis=1)
    rstd = tl.rsqrt(sum_sq / n_cols + eps)
    x_hat = centred * rstd[:, None]
    gain = 1.0 + _load_per_batch(SCALE, batch, stride_scale_b, cols, mask)
    y = x_hat * gain + _load_per_batch(SHIFT, batch, stride_shift_b, cols, mask)
    if HAS_X_DOT or HAS_SCALE_DOT or HAS_SHIFT_DOT:
        y_dot = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if HAS_X_DOT:
            mean_dot = sum_dot / n_cols
            along = rstd * sum_cross / n_cols
            y_dot = (x_dot - mean_dot[:, None] - x_hat * along[:, None]) * (rstd[:, None] * gain)
    out = rows[:, None] * n_cols + cols[None, :]
    tl.store(Y + out, y.to(Y.dtype.element_ty), mask=mask)
    if HAS_X_DOT or HAS_SCALE_DOT or HAS_SHIFT_DOT:
        if HAS_SCALE_DOT:
            y_dot += x_hat * _load_per_batch(SCALE_DOT, batch, stride_scale_dot_b, cols, mask)
        if HAS_SHIFT_DOT:
            y_dot += _load_per_batch(SHIFT_DOT, batch, stride_shift_dot_b, cols, mask)
        tl.store(Y_DOT + out, y_dot.to(Y_DOT.dtype.element_ty), mask=mask)


@on_tensor_device
def jvp_layer_norm_modulate_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    x_dot: torch.Tensor | None,
    scale_dot: torch.Tensor | None,
    shift_dot: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused LayerNorm(x)·(1 + scale) + shift, with the tangent when any tangent is given.

    Args:
        x: (B, N, D), fp16 / bf16 / fp32, unit last stride, any other strides; D <= 8192.
        scale, shift: (B, D), fp16 / bf16 / fp32, unit last stride.
        x_dot, scale_dot, shift_dot: like their primals (their own strides), or None.
        eps: added to the variance.

    Returns:
        y (B, N, D) contiguous in ``promote_types(x, scale, shift)``; y_dot the same, or None.
    """
    batch, n_tokens, n_cols = x.shape
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), shift.dtype)
    y = torch.empty((batch, n_tokens, n_cols), device=x.device, dtype=out_dtype)
    has_tangent = any(t is not None for t in (x_dot, scale_dot, shift_dot))
    y_dot = torch.empty_like(y) if has_tangent else None
    n_rows = batch * n_tokens
    if n_rows == 0:
        return y, y_dot
    block_d = row_block(n_cols)

    def grid(meta):
        return (cdiv(n_rows, rows_per_program(meta["TILE"], block_d)),)

    def stride(t, like, dim):
        return (like if t is None else t).stride(dim)

    _jvp_layer_norm_modulate_kernel[grid](
        x, x if x_dot is None else x_dot, scale, scale if scale_dot is None else scale_dot,
        shift, shift if shift_dot is None else shift_dot, y, y if y_dot is None else y_dot,
        n_rows, n_tokens, n_cols,
        x.stride(0), x.stride(1), stride(x_dot, x, 0), stride(x_dot, x, 1),
        scale.stride(0), stride(scale_dot, scale, 0), shift.stride(0), stride(shift_dot, shift, 0),
        float(eps),
        HAS_X_DOT=x_dot is not None, HAS_SCALE_DOT=scale_dot is not None, HAS_SHIFT_DOT=shift_dot is not None,
        BLOCK_D=block_d,
    )
    return y, y_dot


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------

@triton.autotune(configs=row_configs(), key=["BLOCK_D", "NEEDS_DX", "NEEDS_DSCALE", "NEEDS_DSHIFT"],
                 prune_configs_by={"early_config_prune": row_pruner})
@triton.jit
def _layer_norm_modulate_bwd_kernel(
    G, X, SCALE, DX, DSCALE_PARTIAL, DSHIFT_PARTIAL,
    n_tokens, n_cols, stride_g_b, stride_g_n, stride_x_b, stride_x_n, stride_scale_b, eps, n_programs,
    NEEDS_DX: tl.constexpr, NEEDS_DSCALE: tl.constexpr, NEEDS_DSHIFT: tl.constexpr,
    BLOCK_D: tl.constexpr, TILE: tl.constexpr,
):
    """Program (p, b) (split_program_id) walks the token blocks p, p + n_programs, ... of batch
    element b:
    ĝ = g·(1 + s_b),  dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)); and one partial row each of
    dscale_b = Σ_n g·x̂ and dshift_b = Σ_n g."""
    BLOCK_M: tl.constexpr = TILE // BLOCK_D if TILE > BLOCK_D else 1
    pid, b = split_program_id(n_programs)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    gain = 1.0 + tl.load(SCALE + b * stride_scale_b + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dscale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dshift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for block in range(pid, tl.cdiv(n_tokens, BLOCK_M), n_programs):
        tokens = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (tokens < n_tokens)[:, None] & col_ok[None, :]
        x = tl.load(X + b * stride_x_b + tokens[:, None] * stride_x_n + cols[None, :], mask=mask, other=0.0)
        g = tl.load(G + b * stride_g_b + tokens[:, None] * stride_g_n + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        g = g.to(tl.float32)
        first = tl.load(X + b * stride_x_b + tokens * stride_x_n, mask=tokens < n_tokens, other=0.0)
        centred = _centre(x, first.to(tl.float32), mask, n_cols)
        if NEEDS_DX:
            # One reduction round for the variance and dx's two sums (as in the forward).
            g_hat = g * gain
            sum_sq, sum_g, sum_cross = tl.reduce((centred * centred, g_hat, centred * g_hat), 1, sum3)
        else:
            sum_sq = tl.sum(centred * centred, axis=1)
        rstd = tl.rsqrt(sum_sq / n_cols + eps)
        x_hat = centred * rstd[:, None]
        if NEEDS_DX:
            mean_g = sum_g / n_cols
            along = rstd * sum_cross / n_cols
            dx = (g_hat - mean_g[:, None] - x_hat * along[:, None]) * rstd[:, None]
            dx_rows = DX + (b * n_tokens + tokens)[:, None] * n_cols
            tl.store(dx_rows + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if NEEDS_DSCALE:
            dscale += tl.sum(g * x_hat, axis=0)
        if NEEDS_DSHIFT:
            dshift += tl.sum(g, axis=0)
    partial = (pid * tl.num_programs(1) + b) * n_cols + cols
    if NEEDS_DSCALE:
        tl.store(DSCALE_PARTIAL + partial, dscale, mask=col_ok)
    if NEEDS_DSHIFT:
        tl.store(DSHIFT_PARTIAL + partial, dshift, mask=col_ok)


@on_tensor_device
def jvp_layer_norm_modulate_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    needs_input_grad: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of y = LN(x)·(1 + scale) + shift from grad_y, recomputing the statistics from x.

    Args:
        grad_y: (B, N, D) in y's dtype, unit last stride; x, scale, shift, eps: as the forward.
        needs_input_grad: which of dx, dscale, dshift to compute.

    Returns:
        dx (B, N, D) contiguous in x's dtype, dscale (B, D) in scale's, dshift (B, D) in shift's;
        None where not needed.
    """
    needs_dx, needs_dscale, needs_dshift = needs_input_grad
    batch, n_tokens, n_cols = x.shape
    dx = torch.empty((batch, n_tokens, n_cols), device=x.device, dtype=x.dtype) if needs_dx else None
    if not any(needs_input_grad):
        return None, None, None
    if n_tokens == 0:
        return (dx, torch.zeros_like(scale) if needs_dscale else None,
                torch.zeros_like(shift) if needs_dshift else None)
    if grad_y.stride(-1) != 1:
        grad_y = grad_y.contiguous()
    block_d = row_block(n_cols)
    n_blocks = cdiv(n_tokens, rows_per_program(ROW_TILES[0][0], block_d))
    n_programs = max(1, reduction_programs(x.device, n_blocks * batch) // batch)
    n_programs = min(n_programs, n_blocks)

    def partial(needed):
        if not needed:
            return None
        return torch.empty((n_programs, batch, n_cols), device=x.device, dtype=torch.float32)

    dscale_partial, dshift_partial = partial(needs_dscale), partial(needs_dshift)
    _layer_norm_modulate_bwd_kernel[(n_programs * batch,)](
        grad_y, x, scale, x if dx is None else dx, x if dscale_partial is None else dscale_partial,
        x if dshift_partial is None else dshift_partial,
        n_tokens, n_cols, grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1), scale.stride(0),
        float(eps), n_programs,
        NEEDS_DX=needs_dx, NEEDS_DSCALE=needs_dscale, NEEDS_DSHIFT=needs_dshift, BLOCK_D=block_d,
    )
    return (dx, dscale_partial.sum(0).to(scale.dtype) if needs_dscale else None,
            dshift_partial.sum(0).to(shift.dtype) if needs_dshift else None)
