"""Benchmarks of ``jvp_linear`` (``pytest bench/bench_jvp_linear.py --benchmark-only``).

Cases: ``fwd_jvp`` (the pair forward y = xWᵀ + b, ẏ = ẋWᵀ) and ``fwd_jvp_bwd`` (then
y.backward(ẏ): dx, dW, db). Providers: ``ours`` (two cuBLAS GEMMs on CUDA, the default; the
reference on CPU), ``stacked`` (our op with MEANFLOW_LINEAR_STACKED=1: one GEMM over the
stacked rows [x; ẋ]; on CPU the reference, the same as ours), ``compiled_ref``
(torch.compile of the plain-torch pair), ``func_jvp`` (eager torch.func.jvp of F.linear; the
weight and bias require grad, so forward AD records the tangent: the memory cost pair mode avoids).
Shapes: x (1, 4608, 3072) times W (3072→3072) and (3072→12288), bf16, on CUDA; (1, 256, 512)
times (512→512) float32 on CPU. TFLOP/s on 2·(2M)·Din·Dout for fwd_jvp and 4·M·Din·Dout more
for the backward.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from meanflow.ops import jvp_linear_pair
from meanflow.reference.jvp_linear import jvp_linear_forward

import _timing as timing  # bench/ is on sys.path (bench/conftest.py)

M, D_IN = (4608, 3072) if timing.CUDA else (256, 512)
D_OUTS = (3072, 12288) if timing.CUDA else (512,)
PROVIDERS = ["ours", "stacked", "compiled_ref", "func_jvp"]


def _provider(provider, monkeypatch):
    if provider == "ours":
        return lambda x, xd, w, b: jvp_linear_pair(x, xd, w, b)
    if provider == "stacked":
        monkeypatch.setenv("MEANFLOW_LINEAR_STACKED", "1")
        return lambda x, xd, w, b: jvp_linear_pair(x, xd, w, b)
    if provider == "func_jvp":
        return lambda x, xd, w, b: torch.func.jvp(lambda x: F.linear(x, w, b), (x,), (xd,))
    return timing.compiled(lambda x, xd, w, b: (F.linear(x, w, b),
                                            jvp_linear_forward(x.detach(), w.detach(), None, xd)[1]))


def _inputs(d_out):
    x = torch.randn(1, M, D_IN, device=timing.DEVICE, dtype=timing.DTYPE, requires_grad=True)
    w = (torch.randn(d_out, D_IN, device=timing.DEVICE) * D_IN ** -0.5).to(timing.DTYPE).requires_grad_()
    b = torch.randn(d_out, device=timing.DEVICE, dtype=timing.DTYPE, requires_grad=True)
    return x, torch.randn_like(x), w, b


def _label(d_out):
    return f"M={M} {D_IN}->{d_out} {timing.DTYPE_NAME}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("d_out", D_OUTS)
def test_fwd_jvp(benchmark, monkeypatch, d_out, provider):
    fn = _provider(provider, monkeypatch)
    x, xd, w, b = _inputs(d_out)
    timing.run(benchmark, op="linear", case="fwd_jvp", provider=provider, shape=_label(d_out),
           target=lambda: fn(x, xd, w, b), flops=4 * M * D_IN * d_out)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("d_out", D_OUTS)
def test_fwd_jvp_bwd(benchmark, monkeypatch, d_out, provider):
    fn = _provider(provider, monkeypatch)
    x, xd, w, b = _inputs(d_out)

    def target():
        timing.clear_grads(x, w, b)
        y, y_dot = fn(x, xd, w, b)
        y.backward(y_dot.detach())

    timing.run(benchmark, op="linear", case="fwd_jvp_bwd", provider=provider, shape=_label(d_out), target=target,
           flops=8 * M * D_IN * d_out)
