"""Shared timing for the fused elementwise / linear JVP benchmarks (bench_jvp_<op>.py).

Loaded by those files with importlib (the bench folder is not a package). Each benchmark times
one provider of one case with ``benchmark.pedantic`` (a CUDA synchronisation inside the timed
function, one untimed warm-up call first for compilation and autotuning) and records in
``extra_info``: case, provider, shape, median_ms, GB/s (on the minimal bytes each case must
move) or TFLOP/s (GEMMs), so ``bench/summary.py`` lists the rows next to the attention ones.

Shapes: FLUX's at bf16 on CUDA; one small float32 shape on the CPU so the suite runs anywhere
(``ours`` is then the reference backend, and torch.compile takes tens of seconds per provider).
Environment: MEANFLOW_BENCH_COMPILE=0 skips the torch.compile providers.
"""
from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
COMPILE = os.environ.get("MEANFLOW_BENCH_COMPILE", "1") != "0"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def rounds() -> tuple[int, int]:
    return (20, 3) if CUDA else (5, 1)


def compiled(fn: Callable) -> Callable:
    if not COMPILE:
        pytest.skip("MEANFLOW_BENCH_COMPILE=0")
    return torch.compile(fn, dynamic=False)


def run(benchmark, *, op: str, case: str, provider: str, shape: str, target: Callable[..., object],
        setup: Callable[[], tuple] | None = None, bytes_moved: int | None = None, flops: int | None = None) -> dict:
    """Times ``target(*setup())`` and records it; returns the extra_info."""
    group = f"{op} {case}: {shape}"
    benchmark.group = group

    def prepare():
        args = setup() if setup is not None else ()
        sync()
        return args, {}

    def timed(*args):
        result = target(*args)
        sync()
        return result

    timed(*prepare()[0])  # warm-up: compilation, autotuning
    n_rounds, warmup = rounds()
    benchmark.pedantic(timed, setup=prepare, rounds=n_rounds, warmup_rounds=warmup, iterations=1)
    median = benchmark.stats.stats.median
    info = {"case": f"{op} {case}", "provider": provider, "shape": shape, "group": group,
            "dtype": str(DTYPE).removeprefix("torch."),
            "device": torch.cuda.get_device_name(0) if CUDA else "cpu", "median_ms": round(median * 1e3, 4)}
    if bytes_moved is not None:
        info["bytes"] = bytes_moved
        info["gbps"] = round(bytes_moved / median / 1e9, 1)
    if flops is not None:
        info["flops"] = flops
        info["tflops"] = float(f"{flops / median / 1e12:.4g}")
    benchmark.extra_info.update(info)
    print(f"\n{group} | {provider}: {info['median_ms']:.4f} ms"
          + (f", {info['gbps']} GB/s" if "gbps" in info else "")
          + (f", {info['tflops']} TFLOP/s" if "tflops" in info else ""))
    return info


def clear_grads(*tensors) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t.grad = None
