"""Every Triton kernel compiles for an H100 (sm_90) without a GPU and does not spill; the
attention kernels use wgmma (the row and elementwise kernels have no matrix products).

Runs ``bench/hopper_report.py --quick`` (per kernel variant in bf16 at FLUX shapes, attention at
d=128 with and without packed sequences, the first autotune configuration that the pruning keeps, or the one configuration of a
kernel without autotuning) in a subprocess: the CPU test session runs Triton in interpreter
mode, which has no compiler and its own single configuration, so the kernels must be imported
afresh without TRITON_INTERPRET. About 25 s on 2 cores.
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
    by_variant = {}
    for row in json.loads(out.read_text())["rows"]:
        key = row["op"], row["variant"] + ("+varlen" if row.get("varlen") else "")
        assert key not in by_variant, f"two --quick rows for {key}"
        by_variant[key] = row
    return by_variant


VARIANTS = ["fwd_jvp", "fwd", "bwd_dkdv", "bwd_dq"]  # attention, and with packed sequences (varlen)
VARIANTS += [f"{variant}+varlen" for variant in VARIANTS]
OTHER_OPS = ["rms_norm", "layer_norm_modulate", "activation", "rope", "gated_residual"]
OTHER_VARIANTS = [(op, variant) for op in OTHER_OPS for variant in ("fwd_jvp", "fwd", "bwd")] + [
    ("adaptive_weighted_loss", "fwd_jvp"), ("adaptive_weighted_loss", "fwd"),
    ("alignment_loss", "fwd_jvp"), ("alignment_loss", "fwd"), ("per_sample_scale", "bwd"),
]


def _describe(row):
    config = (" ".join(f"{k}={v}" for k, v in row["meta"].items()) if "meta" in row
              else f"BLOCK_M={row['BLOCK_M']} BLOCK_N={row['BLOCK_N']} d={row['d']}")
    return (f"{row['kernel']} ({row['variant']}) {config} warps={row['warps']} stages={row['stages']} "
            f"{row['dtype']}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_first_config_compiles_with_wgmma(rows, variant):
    assert ("attention", variant) in rows, f"no row for {variant}"
    row = rows["attention", variant]
    assert "error" not in row, f"{_describe(row)} does not compile for sm_90: {row['error']}"
    assert row["hgmma"] > 0, f"{_describe(row)}: no HGMMA (wgmma) in the SASS"


def _assert_no_spill(row):
    assert row["spill"] == 0, (f"{_describe(row)} spills: {row['regs']} registers, {row['spill']} bytes "
                               f"stack/local, {row['stl']} STL / {row['ldl']} LDL "
                               f"({row['loop_stl']} / {row['loop_ldl']} inside a loop)")


@pytest.mark.parametrize("variant", VARIANTS)
def test_first_config_does_not_spill(rows, variant):
    row = rows["attention", variant]
    if "error" in row:
        pytest.skip("does not compile (see test_first_config_compiles_with_wgmma)")
    _assert_no_spill(row)


@pytest.mark.parametrize("op, variant", OTHER_VARIANTS)
def test_other_kernel_first_config_compiles_without_spills(rows, op, variant):
    assert (op, variant) in rows, f"no row for {op} {variant}"
    row = rows[op, variant]
    assert "error" not in row, f"{_describe(row)} does not compile for sm_90: {row['error']}"
    _assert_no_spill(row)


# Loads after a store that each memory-bound kernel is allowed (meanflow.kernels: loads first):
# LayerNorm + modulate's tangent pass reads the per-batch scale / shift tangent rows (two tiles,
# two 16-byte vectors each, L2-resident) after y's store, which saves ~20 registers (one CTA per SM).
LATE_LOADS_ALLOWED = {("layer_norm_modulate", "fwd_jvp"): 4}


MEMORY_BOUND = [(op, v) for op in OTHER_OPS for v in ("fwd_jvp", "fwd", "bwd")] + [
    (op, variant) for op, variant in OTHER_VARIANTS if op not in OTHER_OPS]


@pytest.mark.parametrize("op, variant", MEMORY_BOUND)
def test_memory_bound_kernels_load_before_they_store(rows, op, variant):
    row = rows[op, variant]
    if "error" in row:
        pytest.skip("does not compile (see test_other_kernel_first_config_compiles_without_spills)")
    allowed = LATE_LOADS_ALLOWED.get((op, variant), 0)
    assert row["ldg_after_stg"] <= allowed, (
        f"{_describe(row)}: {row['ldg_after_stg']} global loads follow a store of the same pass "
        f"(allowed {allowed}); the compiler cannot hoist them, so their round trip starts late")


def _sass(lines):
    """nvdisasm-style text: an instruction per string, except labels (".L_x_N:")."""
    out, address = [], 0
    for line in lines:
        if line.endswith(":"):
            out.append(line)
        else:
            out.append(f"        /*{address:04x}*/                   {line} ;")
            address += 16
    return "\n".join(out)


def test_sass_counts_main_loop_ignores_out_of_line_retries():
    """The main loop is the longest span closed by a branch back; a TMA kernel's mbarrier wait
    retries sit after the final EXIT and branch back into the loop, which closes no loop. The
    common path leaves out the longest block a forward branch skips (the lazy rescale)."""
    report = _load_report()
    sass = _sass([
        "MOV R0, RZ",
        ".L_x_0:",                                        # loop head
        "SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [UR4], R1",
        "@!P2 BRA `(.L_x_3)",                             # wait: retried out of line
        ".L_x_4:",
        "HGMMA.64x32x16.F32.BF16 R8, gdesc[UR8], RZ",
        "@P1 BRA `(.L_x_1)",                              # skip the rescale
        "FMUL R2, R2, R3", "FMUL R4, R4, R3", "FMUL R5, R5, R3",
        ".L_x_1:",
        "LDG.E.128 R12, desc[UR6][R10.64]",
        "@P0 BRA `(.L_x_0)",                              # the loop's branch back
        "STG.E.128 desc[UR6][R10.64], R12",
        "EXIT",
        ".L_x_3:",
        "SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [UR4], R1",
        "@!P2 BRA `(.L_x_3)",
        "BRA `(.L_x_4)",                                  # back into the loop: not a loop
        ".L_x_5:",
        "BRA `(.L_x_5)",
    ])
    counts = report.sass_counts(sass)
    assert (counts["loop_len"], counts["loop_common"]) == (9, 6)
    assert (counts["hgmma"], counts["ldg"], counts["ldg128"], counts["stg128"]) == (1, 1, 1, 1)
    assert counts["loop_stl"] == counts["loop_ldl"] == 0
    assert counts["ldg_after_stg"] == 0  # the loop's load is behind a store of a later pass only


def test_sass_counts_loads_after_a_store_of_the_same_pass():
    """A load after a store counts in straight-line code and within one loop body; a loop's
    loads after a store that precedes the loop, or a load before any store, do not."""
    report = _load_report()
    sass = _sass([
        "LDG.E.128 R4, desc[UR6][R2.64]",
        "STG.E.128 desc[UR6][R8.64], R4",                 # a store before the loop
        ".L_x_0:",
        "LDG.E.128 R12, desc[UR6][R10.64]",                # after that store, but another pass
        "STG.E.128 desc[UR6][R14.64], R12",
        "LDG.E.128 R16, desc[UR6][R10.64]",                # same loop body: late
        "@P0 BRA `(.L_x_0)",
        "LDG.E.U16 R18, desc[UR6][R2.64]",                 # straight-line, after the first store: late
        "EXIT",
    ])
    assert report.sass_counts(sass)["ldg_after_stg"] == 2
