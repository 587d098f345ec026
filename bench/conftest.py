"""Harness for ``pytest bench --benchmark-only`` (pytest-benchmark).

- Collects ``bench_*.py`` files in this folder (pytest's default pattern is ``test_*.py``).
- Picks the shapes: on CUDA, B=1, H=24, d=128, bf16, N in {1024, 4608, 16384}; on CPU (no CUDA),
  one small float32 shape so the command still does something (the reference path vs math SDPA).
  Environment overrides: ``MEANFLOW_BENCH_N`` (comma-separated sequence lengths),
  ``MEANFLOW_BENCH_MEM_GIB`` (memory budget for the N×N estimate of math SDPA, default 70).
- ``measure`` fixture: one warm-up call (compilation, autotuning), one call for peak memory, then
  ``benchmark.pedantic`` with a CUDA synchronisation inside the timed function and few rounds at
  large N. It stores median ms, TFLOP/s, peak MiB and, on CUDA, the GPU's busy time of one call
  (``_timing.device_ms``) in ``benchmark.extra_info``; cases skipped
  for memory (by estimate or by a caught OOM) or for an unusable peer are listed under
  ``meanflow_skipped`` in the ``--benchmark-json`` output, so ``bench/summary.py`` shows them.
- Prints the same markdown table as ``bench/summary.py`` at the end of the run.
"""
from __future__ import annotations

import gc
import importlib.util
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

CUDA = torch.cuda.is_available()

# The benchmark files share bench/_timing.py; bench/ is not a package.
sys.path.insert(0, str(Path(__file__).parent))
import _timing as timing  # noqa: E402


_RECORDS: list[dict] = []   # extra_info of every benchmark that ran
_SKIPPED: list[dict] = []   # cases skipped for memory or an unusable provider


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchConfig:
    device: str
    dtype: torch.dtype
    batch: int
    heads: int
    head_dim: int
    seq_lens: tuple[int, ...]
    mem_budget_bytes: int

    def shape(self, n: int) -> str:
        return f"B={self.batch} H={self.heads} N={n} d={self.head_dim} {str(self.dtype).removeprefix('torch.')}"

    def rounds(self, n: int) -> tuple[int, int]:
        """(rounds, warmup_rounds) for ``benchmark.pedantic``: few rounds at large N."""
        if self.device != "cuda":
            return 5, 1
        if n <= 1024:
            return 25, 3
        if n <= 4608:
            return 10, 2
        return 4, 1


def _seq_lens(default: tuple[int, ...]) -> tuple[int, ...]:
    text = os.environ.get("MEANFLOW_BENCH_N", "").strip()
    if not text:
        return default
    return tuple(int(part) for part in text.split(",") if part.strip())


def make_config() -> BenchConfig:
    budget_gib = float(os.environ.get("MEANFLOW_BENCH_MEM_GIB", "70"))
    if CUDA:
        total = torch.cuda.get_device_properties(0).total_memory
        budget = int(min(budget_gib * 2**30, 0.9 * total))
        return BenchConfig("cuda", torch.bfloat16, 1, 24, 128, _seq_lens((1024, 4608, 16384)), budget)
    return BenchConfig("cpu", torch.float32, 1, 2, 64, _seq_lens((256,)), int(budget_gib * 2**30))


CONFIG = make_config()


# --------------------------------------------------------------------------------------------
# Collection and parametrisation
# --------------------------------------------------------------------------------------------

def pytest_configure(config):
    # torch.func.jvp's first call scripts its decompositions: torch's own deprecation, not ours.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def pytest_collect_file(file_path: Path, parent):
    # A file named on the command line is collected by pytest's own Python plugin already.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    if "n_ctx" in metafunc.fixturenames:
        metafunc.parametrize("n_ctx", CONFIG.seq_lens, ids=[f"N{n}" for n in CONFIG.seq_lens])


@pytest.fixture(scope="session")
def bench_cfg() -> BenchConfig:
    return CONFIG


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------

def _free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


class Measure:
    """Callable behind the ``measure`` fixture; see ``__call__``."""

    def __init__(self, benchmark, cfg: BenchConfig):
        self.benchmark = benchmark
        self.cfg = cfg

    def skip(self, info: dict, reason: str) -> None:
        _SKIPPED.append({**info, "skipped": reason})
        _free()
        pytest.skip(f"{info['case']}/{info['provider']} {info['shape']}: {reason}")

    def __call__(
        self,
        *,
        case: str,
        provider: str,
        n_ctx: int,
        target: Callable[..., object],
        setup: Callable[[], tuple] | None = None,
        flop_factor: int,
        nxn_buffers: int = 0,
        tolerate_errors: bool = False,
        backend: str | None = None,
        attended_pairs: int | None = None,
    ) -> dict:
        """Time ``target(*setup())`` and record it.

        Args:
            case, provider: names for the tables; the group is the case and the shape.
            target: the timed work; it ends with a CUDA synchronisation (added here).
            setup: untimed, run before every call (clears gradients, runs the forward of a
                backward-only case); returns the arguments of ``target``.
            flop_factor: FLOPs per (B·H) in units of Nq·Nk·d (4 forward, 12 forward + JVP,
                10 backward, 22 forward + JVP + backward).
            nxn_buffers: how many float32 (B, H, Nq, Nk) buffers the provider holds at its
                peak (math SDPA); skipped without running when they exceed the budget.
            tolerate_errors: for a peer package: any error is recorded as a skip.
            attended_pairs: the (query, key) pairs per head that the work needs, B·N² unless
                given (packed sequences of different lengths: the sum of their squares).
        """
        cfg = self.cfg
        b, h, d = cfg.batch, cfg.heads, cfg.head_dim
        pairs = b * n_ctx * n_ctx if attended_pairs is None else attended_pairs
        flops = flop_factor * h * pairs * d
        info = {
            "case": case, "provider": provider, "shape": cfg.shape(n_ctx), "backend": backend or provider,
            "B": b, "H": h, "N": n_ctx, "d": d, "dtype": str(cfg.dtype).removeprefix("torch."),
            "device": torch.cuda.get_device_name(0) if CUDA else "cpu", "flops": flops,
        }
        group = f"{case}: {cfg.shape(n_ctx)}"
        self.benchmark.group = group
        info["group"] = group

        if nxn_buffers:
            estimate = nxn_buffers * b * h * n_ctx * n_ctx * 4
            info["mem_estimate_gib"] = round(estimate / 2**30, 1)
            if estimate > cfg.mem_budget_bytes:
                self.skip(info, f"estimated {estimate / 2**30:.1f} GiB of N×N buffers "
                                f"> budget {cfg.mem_budget_bytes / 2**30:.1f} GiB")

        def prepare() -> tuple:
            args = setup() if setup is not None else ()
            timing.sync()
            return args

        def timed(*args):
            result = target(*args)
            timing.sync()
            return result

        # Warm-up (compilation, autotuning) and a separate call for peak memory, so that the
        # autotuner's scratch buffers do not count.
        reason = None
        peak_mib = None
        try:
            timed(*prepare())
            _free()
            args = prepare()
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            result = timed(*args)
            if CUDA:
                peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
            del result, args
        except torch.OutOfMemoryError as exc:
            reason = f"OOM ({timing.first_line(exc, 80)})"
        except Exception as exc:  # noqa: BLE001 - a broken peer is a result, not a crash
            if not tolerate_errors:
                raise
            reason = f"error: {timing.first_line(exc)}"
        if reason is not None:
            self.skip(info, reason)
        _free()

        rounds, warmup = cfg.rounds(n_ctx)
        try:
            self.benchmark.pedantic(timed, setup=lambda: (prepare(), {}), rounds=rounds,
                                    warmup_rounds=warmup, iterations=1)
        except torch.OutOfMemoryError as exc:
            reason = f"OOM ({timing.first_line(exc, 80)})"
        except Exception as exc:  # noqa: BLE001
            if not tolerate_errors:
                raise
            reason = f"error: {timing.first_line(exc)}"
        if reason is not None:
            self.skip(info, reason)

        stats = self.benchmark.stats.stats if self.benchmark.stats else None
        if stats is not None:
            median = stats.median
            info["median_ms"] = round(median * 1e3, 4)
            info["tflops"] = float(f"{flops / median / 1e12:.4g}")
        info.update(timing.device_time(target, prepare(), calls=1))
        info["peak_mib"] = None if peak_mib is None else round(peak_mib, 1)
        info["rounds"] = rounds
        self.benchmark.extra_info.update(info)
        _RECORDS.append(dict(info))
        _free()
        return info


@pytest.fixture
def measure(benchmark, bench_cfg) -> Measure:
    return Measure(benchmark, bench_cfg)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------

def _environment() -> dict:
    import triton

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "device": torch.cuda.get_device_name(0) if CUDA else f"cpu ({platform.processor() or platform.machine()})",
        "cuda": torch.version.cuda if CUDA else None,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "backend_env": os.environ.get("MEANFLOW_BACKEND", "auto"),
    }
    try:
        import jvp_flash_attention  # noqa: F401
        from importlib.metadata import version

        env["jvp_flash_attention"] = version("jvp_flash_attention")
    except Exception:  # noqa: BLE001
        env["jvp_flash_attention"] = None
    return env


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["meanflow_env"] = _environment()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["meanflow_skipped"] = list(_SKIPPED)


def _summary_module():
    spec = importlib.util.spec_from_file_location("meanflow_bench_summary", Path(__file__).with_name("summary.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RECORDS and not _SKIPPED:
        return
    summary = _summary_module()
    terminalreporter.write_sep("=", "meanflow attention benchmarks")
    terminalreporter.write_line(summary.caption(_environment()))
    terminalreporter.write_line("")
    for line in summary.format_table(_RECORDS, _SKIPPED).splitlines():
        terminalreporter.write_line(line)
