"""Triton kernel for ``jvp_rope``: FLUX's rotary embedding of x and ẋ in one pass.

On interleaved pairs (x[2i], x[2i+1]) = (e, o), with the tables c = cos, s = sin (N, D):

    forward:   y[2i]   = e·c[2i]   − o·s[2i]        y[2i+1] = o·c[2i+1] + e·s[2i+1]
    backward:  dx[2i]  = g_e·c[2i] + g_o·s[2i+1]    dx[2i+1] = g_o·c[2i+1] − g_e·s[2i]

(the transpose of the rotation, TRANSPOSE constexpr). The tangent takes the same rotation as
the primal, from the same table loads. One program per (batch·head, block of BLOCK_N tokens);
it reads even and odd elements as two strided loads (same cache lines) and works in float32.
x may have any strides with unit stride on the last dim (FLUX passes a transposed view); the
outputs are contiguous (B, H, N, D).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 16
NUM_WARPS = 4


@triton.jit
def _rotate_pairs(ptr, rows, pairs, mask, c_e, c_o, s_e, s_o, TRANSPOSE: tl.constexpr):
    e = tl.load(ptr + rows + 2 * pairs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(ptr + rows + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32)
    if TRANSPOSE:
        return e * c_e + o * s_o, o * c_o - e * s_e
    return e * c_e - o * s_e, o * c_o + e * s_o


@triton.jit
def _jvp_rope_kernel(
    x_ptr, t_ptr, cos_ptr, sin_ptr, y_ptr, y_dot_ptr,
    stride_xb, stride_xh, stride_xn, stride_tb, stride_th, stride_tn, stride_cn, stride_sn,
    n_heads, n_tokens, half_dim,
    HAS_TANGENT: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    p = tl.arange(0, BLOCK_P)
    mask = (n[:, None] < n_tokens) & (p[None, :] < half_dim)
    n64 = n.to(tl.int64)[:, None]
    pairs = p[None, :]

    c_e = tl.load(cos_ptr + n64 * stride_cn + 2 * pairs, mask=mask, other=0.0).to(tl.float32)
    c_o = tl.load(cos_ptr + n64 * stride_cn + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32)
    s_e = tl.load(sin_ptr + n64 * stride_sn + 2 * pairs, mask=mask, other=0.0).to(tl.float32)
    s_o = tl.load(sin_ptr + n64 * stride_sn + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32)

    out_rows = (bh.to(tl.int64) * n_tokens + n64) * (2 * half_dim)
    x_rows = b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + n64 * stride_xn
    y_e, y_o = _rotate_pairs(x_ptr, x_rows, pairs, mask, c_e, c_o, s_e, s_o, TRANSPOSE)
    tl.store(y_ptr + out_rows + 2 * pairs, y_e.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + out_rows + 2 * pairs + 1, y_o.to(y_ptr.dtype.element_ty), mask=mask)
    if HAS_TANGENT:
        t_rows = b.to(tl.int64) * stride_tb + h.to(tl.int64) * stride_th + n64 * stride_tn
        t_e, t_o = _rotate_pairs(t_ptr, t_rows, pairs, mask, c_e, c_o, s_e, s_o, TRANSPOSE)
        tl.store(y_dot_ptr + out_rows + 2 * pairs, t_e.to(y_dot_ptr.dtype.element_ty), mask=mask)
        tl.store(y_dot_ptr + out_rows + 2 * pairs + 1, t_o.to(y_dot_ptr.dtype.element_ty), mask=mask)


def _unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _launch(x, t, cos, sin, transpose):
    x, t, cos, sin = (_unit_last(u) for u in (x, t, cos, sin))
    batch, heads, n_tokens, dim = x.shape
    y = torch.empty((batch, heads, n_tokens, dim), device=x.device, dtype=x.dtype)
    y_dot = None if t is None else torch.empty_like(y)
    tt = x if t is None else t
    grid = (triton.cdiv(n_tokens, BLOCK_N), batch * heads)
    _jvp_rope_kernel[grid](
        x, tt, cos, sin, y, y if y_dot is None else y_dot,
        x.stride(0), x.stride(1), x.stride(2), tt.stride(0), tt.stride(1), tt.stride(2),
        cos.stride(0), sin.stride(0), heads, n_tokens, dim // 2,
        HAS_TANGENT=t is not None, TRANSPOSE=transpose, BLOCK_N=BLOCK_N,
        BLOCK_P=triton.next_power_of_2(max(dim // 2, 1)), num_warps=NUM_WARPS,
    )
    return y, y_dot


def jvp_rope_forward(
    x: torch.Tensor, x_dot: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, ẏ) contiguous (B, H, N, D) in x's dtype; x, x_dot fp16/bf16/fp32 (B, H, N, D), D even;
    cos, sin (N, D) fp16/bf16/fp32."""
    return _launch(x, x_dot, cos, sin, False)


def jvp_rope_backward(grad_y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """dx = g·cos − rot(g·sin), contiguous, in grad_y's dtype."""
    return _launch(grad_y, None, cos, sin, True)[0]
