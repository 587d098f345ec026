"""Shared timing for the benchmarks of the fused elementwise, row-wise and linear JVP ops.

Each benchmark times one provider of one case with ``benchmark.pedantic``: two untimed calls
first (compilation, autotuning), then rounds in which the target runs ``CALLS`` times back to
back before one synchronisation (10 on CUDA: as in a network, the host queues the next launch
while the GPU runs, so an op's host overhead counts only where it exceeds its GPU time). It
records in ``extra_info``: case, provider, shape, median ms per call, and GB/s on the minimal
bytes the case must move or TFLOP/s for GEMMs, so ``bench/summary.py`` lists the rows next to
the attention ones. Shapes are FLUX's at bf16 on CUDA; one small float32 shape on the CPU so
the suite runs anywhere (``ours`` is then the reference backend).

On CUDA each case also records ``device_ms``: the GPU time of one call, the sum of the durations
of the kernels (and copies) it ran, read with ``torch.profiler`` over one more batch of calls.
Wall time per call above device time means the call is bound by its host work (validation,
autograd, launches), not by its kernels: the two columns tell a slow kernel from a slow launch.

Environment: MEANFLOW_BENCH_COMPILE=0 skips the torch.compile providers (tens of seconds each
to compile on a CPU).
"""
from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

from meanflow.benchmark import device_busy_us, device_ms_per_call, first_line  # noqa: F401 (used by the benches)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
CALLS = 10 if CUDA else 1
COMPILE = os.environ.get("MEANFLOW_BENCH_COMPILE", "1") != "0"
DTYPE_NAME = str(DTYPE).removeprefix("torch.")  # for the shape column


def backend_label(provider: str) -> str:
    """``ours/<backend>`` (the backend ``ours`` resolves to on DEVICE), else the provider itself."""
    if provider != "ours":
        return provider
    from meanflow.ops.dispatch import resolve_backend

    return f"ours/{resolve_backend(torch.device(DEVICE))}"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def compiled(fn: Callable) -> Callable:
    """torch.compile of ``fn``, fresh for each benchmark (no recompilation across shapes)."""
    if not COMPILE:
        pytest.skip("MEANFLOW_BENCH_COMPILE=0")
    return torch.compile(fn, dynamic=False)


def clear_grads(*tensors) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t.grad = None


def device_ms(target: Callable[..., object], args: tuple = (), calls: int = CALLS) -> float | None:
    """GPU milliseconds per call of ``target(*args)``, over ``calls`` calls under the profiler;
    None without CUDA."""
    return device_ms_per_call(lambda: target(*args), calls)


def device_time(target: Callable[..., object], args: tuple = (), calls: int = CALLS) -> dict:
    """``{"device_ms": ...}`` for a benchmark row on CUDA (:func:`device_ms`), ``{}`` without
    CUDA, or ``{"device_ms_error": ...}``: the profiler is an aid, its failure keeps the timing."""
    try:
        gpu_ms = device_ms(target, args, calls)
    except Exception as exc:  # noqa: BLE001
        return {"device_ms_error": first_line(exc)}
    return {} if gpu_ms is None else {"device_ms": round(gpu_ms, 4)}


def run(benchmark, *, op: str, case: str, provider: str, shape: str, target: Callable[..., object],
        setup: Callable[[], tuple] | None = None, bytes_moved: int | None = None, flops: int | None = None,
        backend: str | None = None, tolerate_errors: bool = False, calls: int = CALLS) -> dict:
    """Times ``target(*setup())`` and records it; returns the extra_info.

    ``calls``: how many calls each timed round makes before its one synchronisation.

    ``tolerate_errors``: a provider that raises (torch.compile without a working compiler, say)
    is skipped with the reason instead of failing the run.
    """
    group = f"{op} {case}: {shape}"
    benchmark.group = group

    def prepare():
        args = setup() if setup is not None else ()
        sync()
        return args, {}

    def timed(*args):
        for _ in range(calls):
            result = target(*args)
        sync()
        return result

    rounds, warmup = (30, 5) if CUDA else (5, 1)
    try:
        for _ in range(2):
            timed(*prepare()[0])
        benchmark.pedantic(timed, setup=prepare, rounds=rounds, warmup_rounds=warmup, iterations=1)
    except Exception as exc:  # noqa: BLE001 - a provider that cannot run here is a result
        if not tolerate_errors:
            raise
        pytest.skip(f"{provider}: {first_line(exc)}")
    info = {"op": op, "case": f"{op} {case}", "provider": provider, "backend": backend or provider,
            "shape": shape, "group": group, "dtype": str(DTYPE).removeprefix("torch."),
            "device": torch.cuda.get_device_name(0) if CUDA else "cpu", "calls_per_sync": calls}
    if benchmark.stats is None:
        # --benchmark-disable: pedantic ran the target once, untimed. The run is a smoke test
        # of every provider; there is no figure to record.
        info["median_ms"] = None
        benchmark.extra_info.update(info)
        print(f"\nBENCH {group} | {provider:>18} | ran (timing disabled)")
        return info
    median = benchmark.stats.stats.median / calls
    info["median_ms"] = round(median * 1e3, 4)
    info.update(device_time(target, prepare()[0], calls))
    if bytes_moved is not None:
        info["bytes"] = bytes_moved
        info["gbps"] = round(bytes_moved / median / 1e9, 1)
    if flops is not None:
        info["flops"] = flops
        info["tflops"] = float(f"{flops / median / 1e12:.4g}")
    benchmark.extra_info.update(info)
    print(f"\nBENCH {group} | {provider:>18} | {info['median_ms']:9.4f} ms"
          + (f" | device {info['device_ms']:9.4f} ms" if "device_ms" in info else "")
          + (f" | {info['gbps']:8.1f} GB/s" if "gbps" in info else "")
          + (f" | {info['tflops']} TFLOP/s" if "tflops" in info else ""))
    return info
