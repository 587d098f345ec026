"""``meanflow bench``: how fast ``jvp_attention`` is on this machine, beside PyTorch's SDPA.

One shape (B, H, N, d) per sequence length, every case timed side by side in one run:

- ``fwd_jvp``: the output and its tangent along (q̇, k̇, v̇); 12·N²·d FLOPs per (B·H). Providers:
  ``ours_pair`` (``jvp_attention_pair``, as a pair-mode forward calls it), ``ours``
  (``torch.func.jvp`` of ``jvp_attention``) and ``math_sdpa`` (``torch.func.jvp`` of SDPA's math
  backend, the only one with forward AD; the baseline);
- ``fwd_jvp_bwd``: the MeanFlow pattern, the output and tangent, then the gradients of q, k, v
  through the output against the detached tangent; 22·N²·d. ``ours_pair``, ``ours``, ``math_sdpa``;
- ``fwd``: the output alone; 4·N²·d. ``ours`` against ``sdpa`` (PyTorch's own choice of backend:
  flash on a recent GPU; the baseline);
- ``bwd``: the gradients of q, k, v from a kept forward; 10·N²·d. ``ours`` against ``sdpa``.

Each row gives the median milliseconds per call over ``rounds`` rounds of ``calls`` calls between
two synchronisations (the host prepares the next call while the device runs, as in a network),
the TFLOP/s that makes, on CUDA the device's busy time per call (``torch.profiler``: a median
above it means the call waits on its host work) and the peak memory above the inputs, and the
speedup against the case's baseline. Math SDPA is skipped where its float32 N×N buffers would
not fit the memory budget.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CASES = ("fwd_jvp", "fwd_jvp_bwd", "fwd", "bwd")
FLOP_FACTOR = {"fwd": 4, "bwd": 10, "fwd_jvp": 12, "fwd_jvp_bwd": 22}  # × B·H·N²·d
BASELINE = {"fwd_jvp": "math_sdpa", "fwd_jvp_bwd": "math_sdpa", "fwd": "sdpa", "bwd": "sdpa"}
PROVIDERS = {"fwd_jvp": ("ours_pair", "ours", "math_sdpa"), "fwd_jvp_bwd": ("ours_pair", "ours", "math_sdpa"),
             "fwd": ("ours", "sdpa"), "bwd": ("ours", "sdpa")}
# float32 (B, H, N, N) buffers math SDPA holds at its peak (it computes in float32).
MATH_NXN_BUFFERS = {"fwd": 3, "bwd": 5, "fwd_jvp": 6, "fwd_jvp_bwd": 10}


@dataclass
class Shape:
    batch: int
    heads: int
    tokens: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def __str__(self) -> str:
        return (f"B={self.batch} H={self.heads} N={self.tokens} d={self.head_dim} "
                f"{str(self.dtype).removeprefix('torch.')}")


@dataclass
class Row:
    """One provider of one case at one shape; ``skipped`` holds the reason when it did not run."""

    case: str
    provider: str
    shape: str
    median_ms: float | None = None
    device_ms: float | None = None
    tflops: float | None = None
    peak_mib: float | None = None
    speedup: float | None = None
    skipped: str | None = None


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms_per_call(fn: Callable[[], object], device: torch.device, calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the wall milliseconds per call of ``calls`` back-to-back calls of
    ``fn`` followed by one synchronisation; two untimed calls first (compilation, autotuning)."""
    for _ in range(2):
        fn()
    synchronize(device)
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call) * 1e3


def device_busy_us(events) -> float:
    """Microseconds of device work among profiler events: the sum over the device-side ones
    (kernels, copies, fills), each ``time_range`` long; host-side events are left out."""
    from torch.autograd import DeviceType

    return float(sum(e.time_range.elapsed_us() for e in events if e.device_type == DeviceType.CUDA))


def device_ms_per_call(fn: Callable[[], object], calls: int, device: torch.device | None = None) -> float | None:
    """The GPU's busy milliseconds per call of ``fn`` over ``calls`` calls under the profiler;
    None without CUDA or for a ``device`` that is not a GPU (its work would count as 0 ms).
    ``device`` (default: the current CUDA device) is the one synchronised."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    return device_busy_us(prof.events()) / 1e3 / calls


def first_line(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message`` of an exception, for a table cell."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else '')[:limit]}"


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

def _math_sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def _targets(case: str, provider: str, q, k, v, tangents, grad_out) -> Callable[[], object]:
    """The timed call of one provider of one case (q, k, v require grad for the gradient cases)."""
    from meanflow.ops import jvp_attention, jvp_attention_pair

    def output_and_tangent():
        if provider == "ours_pair":
            return jvp_attention_pair(q, k, v, *tangents)
        attention = jvp_attention if provider == "ours" else _math_sdpa
        return torch.func.jvp(attention, (q, k, v), tangents)

    if case == "fwd_jvp":
        return output_and_tangent
    if case == "fwd_jvp_bwd":
        def meanflow_pattern():
            out, tangent = output_and_tangent()
            return torch.autograd.grad(out, (q, k, v), tangent.detach())
        return meanflow_pattern
    attention = jvp_attention if provider == "ours" else F.scaled_dot_product_attention
    if case == "fwd":
        return lambda: attention(q, k, v)
    out = attention(q, k, v)  # kept: the timed calls run its backward again and again
    return lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)


def _inputs(shape: Shape, seed: int, requires_grad: bool):
    g = torch.Generator(device=shape.device).manual_seed(seed)
    size = (shape.batch, shape.heads, shape.tokens, shape.head_dim)

    def randn():
        return torch.randn(size, generator=g, device=shape.device, dtype=shape.dtype)

    q, k, v = (randn().requires_grad_(requires_grad) for _ in range(3))
    return q, k, v, tuple(randn() for _ in range(3)), randn()


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    del result
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_case(case: str, shape: Shape, *, calls: int, rounds: int, memory_budget: float,
             seed: int = 0) -> list[Row]:
    """Every provider of ``case`` at ``shape``; speedups against the case's baseline."""
    # Inputs require grad only where gradients are timed: fwd and fwd_jvp run as inference does.
    q, k, v, tangents, grad_out = _inputs(shape, seed, requires_grad=case in ("fwd_jvp_bwd", "bwd"))
    flops = FLOP_FACTOR[case] * shape.batch * shape.heads * shape.tokens ** 2 * shape.head_dim
    rows = []
    for provider in PROVIDERS[case]:
        row = Row(case, provider, str(shape))
        rows.append(row)
        if provider == "math_sdpa":
            need = MATH_NXN_BUFFERS[case] * shape.batch * shape.heads * shape.tokens ** 2 * 4
            if need > memory_budget:
                row.skipped = (f"math SDPA needs ~{need / 2**30:.1f} GiB of N×N buffers "
                               f"> {memory_budget / 2**30:.1f} GiB")
                continue
        try:
            target = _targets(case, provider, q, k, v, tangents, grad_out)
            row.median_ms = median_ms_per_call(target, shape.device, calls, rounds)
            row.peak_mib = _peak_mib(target, shape.device)
            row.device_ms = device_ms_per_call(target, calls, shape.device)
        except torch.OutOfMemoryError as exc:
            row.skipped = f"out of memory ({first_line(exc, 80)})"
        except Exception as exc:  # noqa: BLE001 - a provider that cannot run here is a result
            row.skipped = first_line(exc)
        finally:
            target = None
            if shape.device.type == "cuda":
                torch.cuda.empty_cache()
        if row.median_ms is not None:
            row.tflops = flops / (row.median_ms * 1e-3) / 1e12
    base = next((r for r in rows if r.provider == BASELINE[case] and r.median_ms is not None), None)
    for row in rows:
        if base is not None and row.median_ms is not None:
            row.speedup = base.median_ms / row.median_ms
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def machine_line(device: torch.device) -> str:
    """The device (the card's name on CUDA), torch, Triton and the backend ``ours`` resolves to."""
    from meanflow.ops.dispatch import resolve_backend

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    return (f"{where}; torch {torch.__version__}, triton {triton_version}, "
            f"python {platform.python_version()}; ours = {resolve_backend(device)} backend")


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, fmt)


def format_table(rows: list[Row]) -> str:
    """A markdown table of ``rows``; the device-time column only when some row has one."""
    with_device = any(r.device_ms is not None for r in rows)
    header = ["case", "provider", "shape", "median ms", *(["device ms"] if with_device else []), "TFLOP/s",
              "peak MiB", "speedup vs baseline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for r in rows:
        if r.skipped is not None:
            cells = [r.case, r.provider, r.shape, f"skipped: {r.skipped}"] + ["–"] * (len(header) - 4)
        else:
            cells = [r.case, r.provider, r.shape, _cell(r.median_ms, ".4g"),
                     *([_cell(r.device_ms, ".4g")] if with_device else []), _cell(r.tflops, ".4g"),
                     _cell(r.peak_mib, ",.0f"), "–" if r.speedup is None else f"{r.speedup:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
