"""Benchmarks of ``jvp_gated_residual`` (``pytest bench/bench_jvp_gated_residual.py --benchmark-only``).

Cases: ``fwd_jvp`` (pair forward with all three tangents) and ``fwd_jvp_bwd`` (then
out.backward(ȯut), gradients to h, gate and y). Providers: ``ours`` (Triton on CUDA, reference
on CPU), ``compiled_ref`` (torch.compile of the plain-torch pair), ``func_jvp`` (eager
torch.func.jvp of ``h + gate.unsqueeze(1) * y`` as diffusers writes it). Shape (1, 4608, 3072)
bf16 on CUDA, (1, 256, 512) float32 on CPU. GB/s on the minimal traffic: forward reads h, y,
ḣ, ẏ and writes out, ȯut; backward reads G, y and writes dy (dh is G itself).
"""
from __future__ import annotations


import pytest
import torch

from meanflow.ops import jvp_gated_residual_pair
from meanflow.reference.jvp_gated_residual import jvp_gated_residual_forward

import _timing as timing  # bench/ is on sys.path (bench/conftest.py)

B, N, D = (1, 4608, 3072) if timing.CUDA else (1, 256, 512)


def formula(h, g, y):
    return h + g.unsqueeze(1) * y


def _provider(provider):
    if provider == "ours":
        return jvp_gated_residual_pair
    if provider == "func_jvp":
        return lambda h, hd, g, gd, y, yd: torch.func.jvp(formula, (h, g, y), (hd, gd, yd))
    return timing.compiled(lambda h, hd, g, gd, y, yd: (
        formula(h, g, y), jvp_gated_residual_forward(h.detach(), g.detach(), y.detach(), hd, gd, yd)[1]))


def _inputs():
    h, y = (torch.randn(B, N, D, device=timing.DEVICE, dtype=timing.DTYPE, requires_grad=True) for _ in range(2))
    g = torch.randn(B, D, device=timing.DEVICE, dtype=timing.DTYPE, requires_grad=True)
    return h, torch.randn_like(h), g, torch.randn_like(g), y, torch.randn_like(y)


def _label():
    return f"B={B} N={N} D={D} {timing.DTYPE_NAME}"


@pytest.mark.parametrize("provider", ["ours", "compiled_ref", "func_jvp"])
def test_fwd_jvp(benchmark, provider):
    fn = _provider(provider)
    args = _inputs()
    moved = 6 * args[0].numel() * args[0].element_size()
    timing.run(benchmark, op="gated_residual", case="fwd_jvp", provider=provider, shape=_label(),
           target=lambda: fn(*args), bytes_moved=moved)


@pytest.mark.parametrize("provider", ["ours", "compiled_ref", "func_jvp"])
def test_fwd_jvp_bwd(benchmark, provider):
    fn = _provider(provider)
    args = _inputs()
    moved = 9 * args[0].numel() * args[0].element_size()

    def target():
        timing.clear_grads(*args)
        out, out_dot = fn(*args)
        out.backward(out_dot.detach())

    timing.run(benchmark, op="gated_residual", case="fwd_jvp_bwd", provider=provider, shape=_label(), target=target,
           bytes_moved=moved)
