"""Benchmarks of ``jvp_layer_norm_modulate``
(``pytest bench/bench_jvp_layer_norm_modulate.py --benchmark-only``).

Shape: FLUX's image stream, x (1, 4608, 3072) bf16 with scale and shift (1, 3072) on CUDA;
(1, 256, 256) float32 on CPU. Tangents of x, scale and shift (all depend on t and r in MeanFlow).

Cases:
- ``pair_fwd``: y and ẏ; at least 4 tensors of x's size moved (x, ẋ in; y, ẏ out).
- ``pair_fwd_bwd``: the same, then ``y.backward(ẏ)`` (gradients through y only); at least 7.

Providers: ``ours`` (``jvp_layer_norm_modulate_pair``: Triton on CUDA, the plain-torch reference
on CPU), ``compiled_reference`` (the reference's fused forward under ``torch.compile``),
``func_jvp_eager`` (``torch.func.jvp`` of the eager plain-torch primal). GB/s in ``extra_info``
counts those minimum bytes.
"""
from __future__ import annotations


import pytest
import torch

from meanflow.ops import jvp_layer_norm_modulate_pair
from meanflow.reference import jvp_layer_norm_modulate as reference

import _timing as timing  # bench/ is on sys.path (bench/conftest.py)

SHAPE = (1, 4608, 3072) if timing.CUDA else (1, 256, 256)
EPS = 1e-6
PROVIDERS = ["ours", "compiled_reference", "func_jvp_eager"]


def _inputs(requires_grad: bool):
    gen = torch.Generator(device=timing.DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=timing.DEVICE, dtype=timing.DTYPE)

    batch, _, dim = SHAPE
    primals = (randn(*SHAPE), randn(batch, dim), randn(batch, dim))
    primals = tuple(t.requires_grad_(requires_grad) for t in primals)
    return primals, (randn(*SHAPE), randn(batch, dim), randn(batch, dim))


def _pair_fn(provider: str):
    """(x, scale, shift), (ẋ, ṡcale, ṡhift) -> (y, y_dot) of the provider; y differentiable."""
    if provider == "ours":
        return lambda p, t: jvp_layer_norm_modulate_pair(p[0], t[0], p[1], t[1], p[2], t[2], EPS)
    if provider == "compiled_reference":
        fused = timing.compiled(lambda x, s, h, xd, sd, hd: reference.jvp_layer_norm_modulate_forward(
            x, s, h, xd, sd, hd, EPS))
        return lambda p, t: fused(*p, *t)
    return lambda p, t: torch.func.jvp(lambda x, s, h: reference.layer_norm_modulate(x, s, h, EPS), p, t)


def _shape() -> str:
    return f"x {SHAPE} {timing.DTYPE_NAME}"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_pair_fwd(benchmark, provider):
    primals, tangents = _inputs(requires_grad=False)
    fn = _pair_fn(provider)
    x = primals[0]
    timing.run(
        benchmark, op="layer_norm_modulate", case="pair_fwd", provider=provider, shape=_shape(),
        target=lambda: fn(primals, tangents), bytes_moved=4 * x.numel() * x.element_size(),
        backend=timing.backend_label(provider), tolerate_errors=provider == "compiled_reference")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_pair_fwd_bwd(benchmark, provider):
    primals, tangents = _inputs(requires_grad=True)
    fn = _pair_fn(provider)
    x = primals[0]

    def setup():
        for p in primals:
            p.grad = None
        return ()

    def target():
        y, y_dot = fn(primals, tangents)
        y.backward(y_dot.detach())

    timing.run(
        benchmark, op="layer_norm_modulate", case="pair_fwd_bwd", provider=provider, shape=_shape(),
        target=target, setup=setup, bytes_moved=7 * x.numel() * x.element_size(), backend=timing.backend_label(provider),
        tolerate_errors=provider == "compiled_reference")
