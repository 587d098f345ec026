"""Benchmarks of ``adaptive_weighted_loss``
(``pytest bench/bench_adaptive_weighted_loss.py --benchmark-only``).

Case ``fwd_bwd``: the loss and its backward to u. Providers: ``ours`` (Triton on CUDA,
reference on CPU), ``compiled_ref`` (torch.compile of the plain formula, forward and backward),
``eager`` (the plain formula in eager torch). Shape (8, 4096, 64) bf16 on CUDA (FLUX's packed
latent at 1024², batch 8), (4, 256, 64) float32 on CPU. GB/s on the minimal traffic: read u and
u_tgt, write du.
"""
from __future__ import annotations

import pytest
import torch

from meanflow.ops import adaptive_weighted_loss

import _timing as timing  # bench/ is on sys.path (bench/conftest.py)

B, N, D = (8, 4096, 64) if timing.CUDA else (4, 256, 64)


def formula(u, u_tgt):
    per_sample = (u.float() - u_tgt.float()).square().flatten(1).sum(1)
    return (per_sample / (per_sample.detach() + 1e-3)).mean()


def _provider(provider):
    if provider == "ours":
        return lambda u, t: adaptive_weighted_loss(u, t)[0]
    if provider == "eager":
        return formula
    return timing.compiled(formula)


@pytest.mark.parametrize("provider", ["ours", "compiled_ref", "eager"])
def test_fwd_bwd(benchmark, provider):
    fn = _provider(provider)
    u = torch.randn(B, N, D, device=timing.DEVICE, dtype=timing.DTYPE, requires_grad=True)
    u_tgt = torch.randn_like(u).detach()

    def target():
        u.grad = None
        fn(u, u_tgt).backward()

    timing.run(benchmark, op="adaptive_weighted_loss", case="fwd_bwd", provider=provider,
               shape=f"B={B} N={N} D={D} {timing.DTYPE_NAME}", target=target,
               bytes_moved=3 * u.numel() * u.element_size())
