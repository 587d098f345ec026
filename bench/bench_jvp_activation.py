"""Benchmarks of ``jvp_gelu_tanh`` / ``jvp_silu`` (``pytest bench/bench_jvp_activation.py --benchmark-only``).

Cases: ``fwd_jvp`` (the pair forward: y and ẏ) and ``fwd_jvp_bwd`` (the pair forward, then
y.backward(ẏ), the MeanFlow pattern). Providers: ``ours`` (Triton on CUDA, reference on CPU),
``compiled_ref`` (torch.compile of the plain-torch pair: the formula with autograd for y, the
reference tangent for ẏ), ``func_jvp`` (eager torch.func.jvp of F.gelu / F.silu).
Shape: (1, 4608, 12288) bf16 on CUDA (FLUX's MLP hidden), (1, 256, 1024) float32 on CPU.
GB/s on the minimal traffic: fwd_jvp reads x, ẋ and writes y, ẏ; the backward reads g, x and
writes dx.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from meanflow.ops import jvp_gelu_tanh_pair, jvp_silu_pair
from meanflow.reference.jvp_activation import jvp_activation_forward

import _timing as timing  # bench/ is on sys.path (bench/conftest.py)

SHAPE = (1, 4608, 12288) if timing.CUDA else (1, 256, 1024)
FORMULA = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}
PAIR = {"gelu_tanh": jvp_gelu_tanh_pair, "silu": jvp_silu_pair}


def _provider(kind, provider):
    formula = FORMULA[kind]
    if provider == "ours":
        return PAIR[kind]
    if provider == "func_jvp":
        return lambda x, xd: torch.func.jvp(formula, (x,), (xd,))
    return timing.compiled(lambda x, xd: (formula(x), jvp_activation_forward(x.detach(), xd, kind)[1]))


def _inputs():
    x = torch.randn(SHAPE, device=timing.DEVICE, dtype=timing.DTYPE, requires_grad=True)
    return x, torch.randn_like(x)


def _label():
    return f"{tuple(SHAPE)} {timing.DTYPE_NAME}"


@pytest.mark.parametrize("provider", ["ours", "compiled_ref", "func_jvp"])
@pytest.mark.parametrize("kind", ["gelu_tanh", "silu"])
def test_fwd_jvp(benchmark, kind, provider):
    fn = _provider(kind, provider)
    x, xd = _inputs()
    numel, size = x.numel(), x.element_size()
    timing.run(benchmark, op=kind, case="fwd_jvp", provider=provider, shape=_label(),
           target=lambda: fn(x, xd), bytes_moved=4 * numel * size)


@pytest.mark.parametrize("provider", ["ours", "compiled_ref", "func_jvp"])
@pytest.mark.parametrize("kind", ["gelu_tanh", "silu"])
def test_fwd_jvp_bwd(benchmark, kind, provider):
    fn = _provider(kind, provider)
    x, xd = _inputs()
    numel, size = x.numel(), x.element_size()

    def target():
        timing.clear_grads(x)
        y, y_dot = fn(x, xd)
        y.backward(y_dot.detach())

    timing.run(benchmark, op=kind, case="fwd_jvp_bwd", provider=provider, shape=_label(), target=target,
           bytes_moved=7 * numel * size)
