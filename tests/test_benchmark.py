"""``meanflow bench`` (meanflow/benchmark.py) on the CPU: every case and provider runs and is
recorded, speedups are against each case's baseline, math SDPA is skipped beyond the memory
budget, a provider that fails becomes a skipped row, and bad arguments are clean errors."""
from __future__ import annotations

import json

import pytest
import torch

from meanflow import benchmark
from meanflow.cli import main

TINY = ["--tokens", "40", "--heads", "1", "--head-dim", "16", "--rounds", "2"]


def _rows(tmp_path, *args):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())["rows"]


def test_every_case_and_provider_runs(tmp_path, capsys):
    rows = _rows(tmp_path)
    expected = [(case, provider) for case in benchmark.CASES for provider in benchmark.PROVIDERS[case]]
    assert [(r["case"], r["provider"]) for r in rows] == expected
    for r in rows:
        assert r["skipped"] is None, r
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["shape"] == "B=1 H=1 N=40 d=16 float32"
        flops = benchmark.FLOP_FACTOR[r["case"]] * 40 * 40 * 16
        assert r["tflops"] == pytest.approx(flops / (r["median_ms"] * 1e-3) / 1e12)
        base = next(b for b in rows if b["case"] == r["case"] and b["provider"] == benchmark.BASELINE[r["case"]])
        assert r["speedup"] == pytest.approx(base["median_ms"] / r["median_ms"])
    table = capsys.readouterr().out
    assert "| fwd_jvp | ours_pair | B=1 H=1 N=40 d=16 float32 |" in table and "reference backend" in table


def test_math_sdpa_beyond_the_budget_is_skipped(tmp_path):
    rows = _rows(tmp_path, "--cases", "fwd_jvp", "--memory-budget-gib", "1e-9")
    math = next(r for r in rows if r["provider"] == "math_sdpa")
    assert math["median_ms"] is None and "N×N buffers" in math["skipped"]
    assert all(r["speedup"] is None for r in rows)  # no baseline, no ratio
    assert all(r["median_ms"] > 0 for r in rows if r["provider"] != "math_sdpa")


def test_a_failing_provider_is_a_skipped_row(monkeypatch):
    real = benchmark._targets

    def targets(case, provider, *args):
        if provider == "ours":
            raise RuntimeError("no kernel for this\nsecond line")
        return real(case, provider, *args)

    monkeypatch.setattr(benchmark, "_targets", targets)
    shape = benchmark.Shape(1, 1, 24, 8, torch.float32, torch.device("cpu"))
    rows = benchmark.run_case("fwd", shape, calls=1, rounds=1, memory_budget=2**30)
    assert rows[0].skipped == "RuntimeError: no kernel for this" and rows[0].median_ms is None
    assert rows[1].speedup == 1.0
    assert "skipped: RuntimeError: no kernel for this" in benchmark.format_table(rows)


def test_median_counts_warm_up_and_calls():
    seen = []
    ms = benchmark.median_ms_per_call(lambda: seen.append(1), torch.device("cpu"), calls=3, rounds=4)
    assert len(seen) == 2 + 3 * 4 and ms >= 0


def test_table_shows_device_time_only_when_measured():
    row = benchmark.Row("fwd", "ours", "B=1 H=1 N=8 d=8 float32", median_ms=2.0, tflops=1.0, speedup=1.0)
    assert "device ms" not in benchmark.format_table([row])
    row.device_ms = 1.5
    lines = benchmark.format_table([row]).splitlines()
    assert "device ms" in lines[0] and "| 2 | 1.5 |" in lines[2]


@pytest.mark.parametrize("args", [["--memory-budget-gib", "-1"], ["--memory-budget-gib", "nan"],
                                  ["--tokens", "0"], ["--cases", "everything"]])
def test_bad_arguments_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    assert exit_info.value.code == 2 and "usage" in capsys.readouterr().err


def test_unavailable_device_is_a_clear_error(capsys):
    assert main(["bench", *TINY, "--device", "tpu"]) == 2
    assert "--device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", *TINY, "--device", "cuda"]) == 2
        assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_no_device_time_for_a_cpu_device_on_a_gpu_machine(monkeypatch):
    """--device cpu where CUDA is present: the profiler sees no GPU work, which is no device
    time (None, no column), not 0 ms."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    shape = benchmark.Shape(1, 1, 24, 8, torch.float32, torch.device("cpu"))
    rows = benchmark.run_case("fwd", shape, calls=1, rounds=1, memory_budget=2**30)
    assert all(r.skipped is None and r.device_ms is None for r in rows), rows
    assert "device ms" not in benchmark.format_table(rows)


def test_a_cuda_index_the_machine_lacks_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["bench", *TINY, "--device", "cuda:3"]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "1 CUDA device" in err


def test_a_json_path_without_a_folder_is_refused_before_timing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "run_case", lambda *a, **k: pytest.fail("timed before checking --json"))
    assert main(["bench", *TINY, "--json", str(tmp_path / "missing" / "out.json")]) == 2
    assert "--json" in capsys.readouterr().err
