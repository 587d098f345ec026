"""The attention kernels compile for an H100 (sm_90) without a GPU, use wgmma and do not spill.

Runs ``bench/hopper_report.py --quick`` (per kernel variant at d=128 bf16, FLUX shapes, the
first autotune configuration that the shared-memory pruning keeps) in a subprocess: the CPU
test session runs Triton in interpreter mode, which has no compiler and its own single
configuration, so the kernels must be imported afresh without TRITON_INTERPRET. About 20 s on 2 cores.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[2] / "bench" / "hopper_report.py"


def _load_report():
    spec = importlib.util.spec_from_file_location("hopper_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    report = _load_report()
    missing = report.missing_tools()
    if missing:
        pytest.skip(f"Triton's nvidia backend tools are missing ({', '.join(missing)}): "
                    "cannot compile for sm_90")
    out = tmp_path_factory.mktemp("hopper") / "quick.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPORT), "--quick", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert out.exists(), f"report failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return {row["variant"]: row for row in json.loads(out.read_text())["rows"]}


VARIANTS = ["fwd_jvp", "fwd", "bwd_dkdv", "bwd_dq"]


def _describe(row):
    return (f"{row['kernel']} BLOCK_M={row['BLOCK_M']} BLOCK_N={row['BLOCK_N']} "
            f"warps={row['warps']} stages={row['stages']} d={row['d']} {row['dtype']}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_first_config_compiles_with_wgmma(rows, variant):
    assert variant in rows, f"no row for {variant}"
    row = rows[variant]
    assert "error" not in row, f"{_describe(row)} does not compile for sm_90: {row['error']}"
    assert row["hgmma"] > 0, f"{_describe(row)}: no HGMMA (wgmma) in the SASS"


@pytest.mark.parametrize("variant", VARIANTS)
def test_first_config_does_not_spill(rows, variant):
    row = rows[variant]
    if "error" in row:
        pytest.skip("does not compile (see test_first_config_compiles_with_wgmma)")
    assert row["spill"] == 0, (f"{_describe(row)} spills: {row['regs']} registers, {row['spill']} bytes "
                               f"stack/local, {row['stl']} STL / {row['ldl']} LDL "
                               f"({row['loop_stl']} / {row['loop_ldl']} inside a loop)")
