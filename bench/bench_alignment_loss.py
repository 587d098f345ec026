"""Benchmarks of ``alignment_loss`` (``pytest bench/bench_alignment_loss.py --benchmark-only``).

Case ``fwd_bwd``: L_align and its backward to x̂. Providers: ``ours`` (Triton on CUDA,
reference on CPU), ``compiled_ref`` (torch.compile of the plain formula ½‖x̂ − sg(x̂ − g)‖²,
forward and backward), ``eager`` (the same in eager torch). Shape (8, 4096, 64) bf16 on CUDA,
(4, 256, 64) float32 on CPU. GB/s on the minimal traffic: read x̂, x0_fake, x0_teacher, write dx̂.
"""
from __future__ import annotations

import pytest
import torch

from meanflow.ops import alignment_loss

import _timing as timing  # bench/ is on sys.path (bench/conftest.py)

B, N, D = (8, 4096, 64) if timing.CUDA else (4, 256, 64)


def formula(x_hat, x0_fake, x0_teacher):
    x, f, t = x_hat.float(), x0_fake.float(), x0_teacher.float()
    denom = (x - t).abs().mean((1, 2), keepdim=True).clamp_min(1e-4).detach()
    g = (f - t) / denom
    return (0.5 * (x - (x - g).detach()).square().flatten(1).sum(1)).mean()


def _provider(provider):
    if provider == "ours":
        return lambda x, f, t: alignment_loss(x, f, t)[0]
    if provider == "eager":
        return formula
    return timing.compiled(formula)


@pytest.mark.parametrize("provider", ["ours", "compiled_ref", "eager"])
def test_fwd_bwd(benchmark, provider):
    fn = _provider(provider)
    x_hat = torch.randn(B, N, D, device=timing.DEVICE, dtype=timing.DTYPE, requires_grad=True)
    x0_fake, x0_teacher = torch.randn_like(x_hat).detach(), torch.randn_like(x_hat).detach()

    def target():
        x_hat.grad = None
        fn(x_hat, x0_fake, x0_teacher).backward()

    timing.run(benchmark, op="alignment_loss", case="fwd_bwd", provider=provider,
               shape=f"B={B} N={N} D={D} {timing.DTYPE_NAME}", target=target,
               bytes_moved=4 * x_hat.numel() * x_hat.element_size())
