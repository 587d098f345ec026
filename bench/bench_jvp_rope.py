"""Benchmarks of ``jvp_rope`` (``pytest bench/bench_jvp_rope.py --benchmark-only``).

Cases: ``fwd_jvp`` (pair forward) and ``fwd_jvp_bwd`` (pair forward, then y.backward(ẏ)).
Providers: ``ours`` (Triton on CUDA, reference on CPU), ``compiled_ref`` (torch.compile of the
plain-torch pair), ``func_jvp`` (eager torch.func.jvp of diffusers' arithmetic). x is FLUX's
transposed view of (B, N, H, D) memory. Shape (1, 24, 4608, 128) bf16 on CUDA, (1, 4, 256, 64)
float32 on CPU; tables (N, D) float32. GB/s on the minimal traffic (x, ẋ, y, ẏ, the tables;
backward g, dx, the tables).
"""
from __future__ import annotations


import pytest
import torch

from meanflow.ops import jvp_rope_pair
from meanflow.reference.jvp_rope import jvp_rope_forward

import _timing as timing  # bench/ is on sys.path (bench/conftest.py)

B, H, N, D = (1, 24, 4608, 128) if timing.CUDA else (1, 4, 256, 64)


def diffusers_rope(x, cos, sin):
    """diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-1), inlined."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-odd, even), dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _provider(provider):
    if provider == "ours":
        return jvp_rope_pair
    if provider == "func_jvp":
        return lambda x, xd, c, s: torch.func.jvp(lambda x: diffusers_rope(x, c, s), (x,), (xd,))
    return timing.compiled(lambda x, xd, c, s: (diffusers_rope(x, c, s), jvp_rope_forward(x.detach(), xd, c, s)[1]))


def _inputs():
    x = torch.randn(B, N, H, D, device=timing.DEVICE, dtype=timing.DTYPE).transpose(1, 2).requires_grad_()
    xd = torch.randn(B, N, H, D, device=timing.DEVICE, dtype=timing.DTYPE).transpose(1, 2)
    angles = torch.rand(N, D // 2, device=timing.DEVICE).repeat_interleave(2, -1) * 6
    return x, xd, angles.cos(), angles.sin()


def _label():
    return f"B={B} H={H} N={N} D={D} {timing.DTYPE_NAME}"


@pytest.mark.parametrize("provider", ["ours", "compiled_ref", "func_jvp"])
def test_fwd_jvp(benchmark, provider):
    fn = _provider(provider)
    x, xd, cos, sin = _inputs()
    moved = 4 * x.numel() * x.element_size() + 2 * cos.numel() * 4
    timing.run(benchmark, op="rope", case="fwd_jvp", provider=provider, shape=_label(),
           target=lambda: fn(x, xd, cos, sin), bytes_moved=moved)


@pytest.mark.parametrize("provider", ["ours", "compiled_ref", "func_jvp"])
def test_fwd_jvp_bwd(benchmark, provider):
    fn = _provider(provider)
    x, xd, cos, sin = _inputs()
    moved = 6 * x.numel() * x.element_size() + 4 * cos.numel() * 4

    def target():
        timing.clear_grads(x)
        y, y_dot = fn(x, xd, cos, sin)
        y.backward(y_dot.detach())

    timing.run(benchmark, op="rope", case="fwd_jvp_bwd", provider=provider, shape=_label(), target=target,
           bytes_moved=moved)
