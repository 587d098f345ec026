"""Benchmarks of ``jvp_rms_norm`` (``pytest bench/bench_jvp_rms_norm.py --benchmark-only``).

Shape: FLUX's per-head query norm, x (B, N, H, d) = (1, 4608, 24, 128) bf16 with a (128,) weight on
CUDA; (1, 256, 4, 64) float32 on CPU. Tangent of x only (the weight's is zero in pair mode).

Cases:
- ``pair_fwd``: y and ẏ from x, ẋ; at least 4 tensors of x's size moved (x, ẋ in; y, ẏ out).
- ``pair_fwd_bwd``: the same, then ``y.backward(ẏ)`` (gradients through y only, as MeanFlow's
  stop-gradient target); at least 7 (plus x, grad in, dx out).

Providers: ``ours`` (``jvp_rms_norm_pair``: Triton on CUDA, the plain-torch reference on CPU),
``compiled_reference`` (the reference's fused forward, ``meanflow.reference.jvp_rms_norm``,
under ``torch.compile``), ``func_jvp_eager`` (``torch.func.jvp`` of the eager plain-torch primal).
GB/s in ``extra_info`` counts those minimum bytes.
"""
from __future__ import annotations


import pytest
import torch

from meanflow.ops import jvp_rms_norm_pair
from meanflow.reference import jvp_rms_norm as reference

import _timing as timing  # bench/ is on sys.path (bench/conftest.py)

SHAPE = (1, 4608, 24, 128) if timing.CUDA else (1, 256, 4, 64)
EPS = 1e-6
PROVIDERS = ["ours", "compiled_reference", "func_jvp_eager"]


def _inputs(requires_grad: bool):
    gen = torch.Generator(device=timing.DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=timing.DEVICE, dtype=timing.DTYPE)

    x = randn(*SHAPE).requires_grad_(requires_grad)
    weight = (1 + 0.1 * randn(SHAPE[-1])).requires_grad_(requires_grad)
    return x, weight, randn(*SHAPE)


def _pair_fn(provider: str):
    """(x, weight, x_dot) -> (y, y_dot) of the provider; y differentiable."""
    if provider == "ours":
        return lambda x, w, x_dot: jvp_rms_norm_pair(x, x_dot, w, EPS)
    if provider == "compiled_reference":
        fused = timing.compiled(lambda x, w, x_dot: reference.jvp_rms_norm_forward(x, w, EPS, x_dot))
        return fused
    return lambda x, w, x_dot: torch.func.jvp(lambda x: reference.rms_norm(x, w, EPS), (x,), (x_dot,))


def _shape() -> str:
    return f"x {SHAPE} {timing.DTYPE_NAME}"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_pair_fwd(benchmark, provider):
    x, w, x_dot = _inputs(requires_grad=False)
    fn = _pair_fn(provider)
    timing.run(
        benchmark, op="rms_norm", case="pair_fwd", provider=provider, shape=_shape(),
        target=lambda: fn(x, w, x_dot), bytes_moved=4 * x.numel() * x.element_size(),
        backend=timing.backend_label(provider), tolerate_errors=provider == "compiled_reference")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_pair_fwd_bwd(benchmark, provider):
    x, w, x_dot = _inputs(requires_grad=True)
    fn = _pair_fn(provider)

    def setup():
        x.grad = w.grad = None
        return ()

    def target():
        y, y_dot = fn(x, w, x_dot)
        y.backward(y_dot.detach())

    timing.run(
        benchmark, op="rms_norm", case="pair_fwd_bwd", provider=provider, shape=_shape(), target=target,
        setup=setup, bytes_moved=7 * x.numel() * x.element_size(), backend=timing.backend_label(provider),
        tolerate_errors=provider == "compiled_reference")
