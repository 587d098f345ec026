"""The benchmark harness's own logic (bench/ is scripts, not a package: loaded by path).

- ``_timing.device_busy_us`` counts the GPU's events only;
- ``summary.format_table`` shows the device-time column when rows carry it;
- ``flux_memory.py --autocast`` runs a pair step and the baselines over float32 parameters;
- every benchmark runs with ``--benchmark-disable`` (once each, untimed).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _event(name: str, start: int, end: int, device_type) -> FunctionEvent:
    return FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end, device_type=device_type)


def test_device_busy_us_sums_only_device_events():
    timing = _load("_timing")
    events = [_event("launch", 0, 50, DeviceType.CPU), _event("kernel", 10, 13, DeviceType.CUDA),
              _event("memcpy", 20, 27, DeviceType.CUDA), _event("aten::add", 30, 90, DeviceType.CPU)]
    assert timing.device_busy_us(events) == 10.0
    assert timing.device_busy_us(events[:1]) == 0.0


def test_summary_shows_device_time_when_recorded():
    summary = _load("summary")
    row = dict(case="fwd_jvp", provider="ours", shape="B=1 H=24 N=4608 d=128 bfloat16", N=4608,
               median_ms=2.5, tflops=300.0, peak_mib=140.0)
    without = summary.format_table([row])
    assert "device ms" not in without
    table = summary.format_table([dict(row, device_ms=2.25)]).splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    cells = [cell.strip() for cell in table[2].strip("|").split("|")]
    assert header[3:5] == ["median ms", "device ms"]
    assert cells[3:5] == ["2.500", "2.250"]


@pytest.mark.slow
def test_flux_memory_step_under_autocast():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "flux_memory.py"), "--autocast", "bfloat16", "--hidden", "64",
         "--head-dim", "32", "--double", "1", "--single", "1", "--image-tokens", "16", "--text-tokens", "4",
         "--batch", "1", "--allocator", "default", "--modes", "plain,pair,jvp"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert "under bfloat16 autocast" in proc.stdout
    for mode in ("plain", "pair", "jvp"):
        cells = [cell.strip() for cell in rows[mode].strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[-1]) > 0, rows[mode]  # peak growth (MiB), ms


def test_flux_memory_refuses_autocast_over_half_parameters():
    proc = subprocess.run([sys.executable, str(BENCH / "flux_memory.py"), "--autocast", "bfloat16",
                           "--dtype", "bfloat16"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "use --dtype float32" in proc.stderr


def test_every_benchmark_runs_with_timing_disabled():
    """``pytest bench --benchmark-disable`` runs each provider once, untimed: a smoke test of the
    whole suite on the CPU (it used to fail in ``_timing.run``, which read absent stats)."""
    env = dict(os.environ, MEANFLOW_BENCH_COMPILE="0")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(BENCH), "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=900, env=env, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 40, proc.stdout[-2000:]  # every op's benches ran
