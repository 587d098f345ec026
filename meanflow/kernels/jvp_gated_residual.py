"""Triton kernels for ``jvp_gated_residual``: out = h + g·y and its tangent in one pass.

    out = h + g·y            ȯut = ḣ + ġ·y + g·ẏ        (HAS_H_DOT, HAS_G_DOT, HAS_Y_DOT)
    backward: dh = G (passed through),  dy = g·G,  dg = Σ_n G·y

h, y (B, N, D) with unit stride on D, any batch/token strides; g (B, D) broadcast over the
tokens (each program loads its slice of g once). Arithmetic in float32, one rounding per
output. The forward program covers (BLOCK_N tokens × BLOCK_D channels) of one batch row; the
backward program walks CHUNK_N tokens for its BLOCK_D channels, writes dy and one float32
partial sum of G·y, and the partials (few: N / CHUNK_N per channel) are summed by torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meanflow.kernels.launch import cdiv, on_tensor_device, split_program_id

# 8 tokens × 256 channels at 8 warps: one 16-byte vector per thread per tensor; the forward with
# every tangent then takes 40 registers, 6 CTAs per SM (16 tokens: 73 registers, 3 CTAs per SM).
BLOCK_N, BLOCK_D, NUM_WARPS = 8, 256, 8
CHUNK_N = 128  # tokens per backward program


@triton.jit
def _jvp_gated_residual_fwd_kernel(
    h_ptr, g_ptr, y_ptr, hd_ptr, gd_ptr, yd_ptr, out_ptr, out_dot_ptr,
    s_hb, s_hn, s_gb, s_yb, s_yn, s_hdb, s_hdn, s_gdb, s_ydb, s_ydn,
    n_tokens, dim,
    HAS_H_DOT: tl.constexpr, HAS_G_DOT: tl.constexpr, HAS_Y_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block, b = split_program_id(tl.cdiv(n_tokens, BLOCK_N))
    n = (block * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None]
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (n < n_tokens) & (d[None, :] < dim)
    # Loads first; the gate rows as (BLOCK_N, BLOCK_D) tiles of token stride 0 (meanflow.kernels).
    gate_offs = n * 0 + d[None, :]
    h = tl.load(h_ptr + b * s_hb + n * s_hn + d[None, :], mask=mask, other=0.0)
    y = tl.load(y_ptr + b * s_yb + n * s_yn + d[None, :], mask=mask, other=0.0)
    if HAS_H_DOT:
        h_dot = tl.load(hd_ptr + b * s_hdb + n * s_hdn + d[None, :], mask=mask, other=0.0)
    if HAS_Y_DOT:
        y_dot = tl.load(yd_ptr + b * s_ydb + n * s_ydn + d[None, :], mask=mask, other=0.0)
    g = tl.load(g_ptr + b * s_gb + gate_offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_G_DOT:
        g_dot = tl.load(gd_ptr + b * s_gdb + gate_offs, mask=mask, other=0.0).to(tl.float32)
    y = y.to(tl.float32)
    out_offs = (b * n_tokens + n) * dim + d[None, :]
    tl.store(out_ptr + out_offs, (h.to(tl.float32) + g * y).to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_H_DOT or HAS_G_DOT or HAS_Y_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        if HAS_H_DOT:
            acc += h_dot.to(tl.float32)
        if HAS_G_DOT:
            acc += g_dot * y
        if HAS_Y_DOT:
            acc += g * y_dot.to(tl.float32)
        tl.store(out_dot_ptr + out_offs, acc.to(out_dot_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _jvp_gated_residual_bwd_kernel(
    go_ptr, g_ptr, y_ptr, dy_ptr, dg_partial_ptr,
    s_gob, s_gon, s_gb, s_yb, s_yn, n_tokens, dim, n_batch,
    NEED_Y: tl.constexpr, NEED_G: tl.constexpr,
    CHUNK_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    chunk, b = split_program_id(tl.cdiv(n_tokens, CHUNK_N))
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    g = tl.load(g_ptr + b * s_gb + d, mask=d < dim, other=0.0).to(tl.float32)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start in range(0, CHUNK_N, BLOCK_N):
        n = (chunk * CHUNK_N + start + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None]
        mask = (n < n_tokens) & (d[None, :] < dim)
        go = tl.load(go_ptr + b * s_gob + n * s_gon + d[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_G:  # y loaded before dy's store (meanflow.kernels: loads first)
            acc += go * tl.load(y_ptr + b * s_yb + n * s_yn + d[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_Y:
            tl.store(dy_ptr + (b * n_tokens + n) * dim + d[None, :], (g * go).to(dy_ptr.dtype.element_ty),
                     mask=mask)
    if NEED_G:
        tl.store(dg_partial_ptr + (chunk * n_batch + b) * dim + d, tl.sum(acc, axis=0), mask=d < dim)


def _unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor | None, like: torch.Tensor, n: int) -> tuple[int, ...]:
    return tuple((t if t is not None else like).stride()[:n])


@on_tensor_device
def jvp_gated_residual_forward(
    h: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    h_dot: torch.Tensor | None = None,
    gate_dot: torch.Tensor | None = None,
    y_dot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, ȯut) contiguous (B, N, D) in h's dtype; h, y (B, N, D), gate (B, D), tangents like
    their primals or None; fp16/bf16/fp32, one dtype."""
    h, gate, y, h_dot, gate_dot, y_dot = (_unit_last(t) for t in (h, gate, y, h_dot, gate_dot, y_dot))
    batch, n_tokens, dim = h.shape
    out = torch.empty((batch, n_tokens, dim), device=h.device, dtype=h.dtype)
    has_tangent = any(t is not None for t in (h_dot, gate_dot, y_dot))
    out_dot = torch.empty_like(out) if has_tangent else None
    grid = (cdiv(n_tokens, BLOCK_N) * batch, cdiv(dim, BLOCK_D))
    _jvp_gated_residual_fwd_kernel[grid](
        h, gate, y, h if h_dot is None else h_dot, gate if gate_dot is None else gate_dot,
        y if y_dot is None else y_dot, out, out if out_dot is None else out_dot,
        *h.stride()[:2], gate.stride(0), *y.stride()[:2], *_strides(h_dot, h, 2), _strides(gate_dot, gate, 1)[0],
        *_strides(y_dot, y, 2), n_tokens, dim,
        HAS_H_DOT=h_dot is not None, HAS_G_DOT=gate_dot is not None, HAS_Y_DOT=y_dot is not None,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
    )
    return out, out_dot


@on_tensor_device
def jvp_gated_residual_backward(
    grad_out: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    need_h: bool = True,
    need_gate: bool = True,
    need_y: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dh, dgate (B, D), dy), None where not needed; dh is grad_out itself."""
    dh = grad_out if need_h else None
    if not (need_gate or need_y):
        return dh, None, None
    grad_out, gate, y = (_unit_last(t) for t in (grad_out, gate, y))
    batch, n_tokens, dim = grad_out.shape
    chunks = cdiv(n_tokens, CHUNK_N)
    dy = torch.empty((batch, n_tokens, dim), device=y.device, dtype=y.dtype) if need_y else None
    partial = torch.empty((chunks, batch, dim), device=y.device, dtype=torch.float32) if need_gate else None
    _jvp_gated_residual_bwd_kernel[(chunks * batch, cdiv(dim, BLOCK_D))](
        grad_out, gate, y, y if dy is None else dy, gate if partial is None else partial,
        *grad_out.stride()[:2], gate.stride(0), *y.stride()[:2], n_tokens, dim, batch,
        NEED_Y=need_y, NEED_G=need_gate, CHUNK_N=CHUNK_N, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
    )
    dg = partial.sum(0).to(gate.dtype) if need_gate else None
    return dh, dg, dy
