"""Shared timing for the row-wise op benchmarks (bench_jvp_rms_norm.py, bench_jvp_layer_norm_modulate.py).

Memory-bound ops are judged by bandwidth: ``measure_bandwidth`` times a target with
``benchmark.pedantic``; each timed call runs the target ``CALLS`` times back to back and then
synchronises once (10 on CUDA: as in a network, the host queues the next launch while the
GPU runs, so an op's host overhead counts only where it exceeds its GPU time). It stores in
``benchmark.extra_info`` the median ms per call and the GB/s of the bytes the op must read and
write at least (its inputs once, its outputs once), with the case, provider, shape and device;
each measurement is also printed as one ``BENCH`` line (visible with ``-s``). Providers that cannot
run here (torch.compile without a working compiler, say) are skipped with the reason.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
CALLS = 10 if CUDA else 1


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else '')[:limit]}"


def measure_bandwidth(
    benchmark,
    *,
    op: str,
    case: str,
    provider: str,
    shape: str,
    target: Callable[..., object],
    setup: Callable[[], tuple] | None = None,
    bytes_moved: int,
    backend: str | None = None,
    tolerate_errors: bool = False,
) -> dict:
    """Time ``target(*setup())`` and record median ms per call and GB/s (``bytes_moved`` / median)."""
    group = f"{op} {case}: {shape}"
    benchmark.group = group
    info = {"op": op, "case": case, "provider": provider, "backend": backend or provider, "shape": shape,
            "group": group, "bytes": bytes_moved,
            "device": torch.cuda.get_device_name(0) if CUDA else "cpu"}

    def prepare():
        args = setup() if setup is not None else ()
        sync()
        return args, {}

    def timed(*args):
        for _ in range(CALLS):
            result = target(*args)
        sync()
        return result

    rounds, warmup = (30, 5) if CUDA else (5, 1)
    try:
        for _ in range(2):  # compilation, autotuning
            timed(*prepare()[0])
        benchmark.pedantic(timed, setup=prepare, rounds=rounds, warmup_rounds=warmup, iterations=1)
    except Exception as exc:  # noqa: BLE001 - a provider that cannot run here is a result
        if not tolerate_errors:
            raise
        pytest.skip(f"{provider}: {_first_line(exc)}")
    median = benchmark.stats.stats.median / CALLS
    info["calls_per_sync"] = CALLS
    info["median_ms"] = round(median * 1e3, 4)
    info["gbps"] = round(bytes_moved / median / 1e9, 1)
    benchmark.extra_info.update(info)
    print(f"\nBENCH {group} | {provider:>18} | {info['median_ms']:9.4f} ms | {info['gbps']:8.1f} GB/s")
    return info


def compiled(fn: Callable) -> Callable:
    """torch.compile of ``fn``, fresh for each benchmark (no recompilation across shapes)."""
    return torch.compile(fn, dynamic=False)
