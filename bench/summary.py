#!/usr/bin/env python3
"""Prints the attention benchmarks of a pytest-benchmark JSON file as one markdown table.

    python bench/summary.py out/bench.json >> bench/RESULTS.md   # after review

Columns: case, provider, shape, median ms, device ms (the GPU's busy time per call, where
recorded: below the median, the call waits on its host work), TFLOP/s (on 4/12/10/22·Nq·Nk·d per B·H for
fwd/fwd_jvp/bwd/fwd_jvp_bwd), peak MiB (CUDA max_memory_allocated over the call, less what
was allocated before it), speedup vs math SDPA (its median / this median, same case and shape)
and, where the case has a flash SDPA row, speedup vs flash SDPA. Rows that were skipped (memory
estimate, OOM, unusable peer) are listed with their reason. Standard library only.
"""
from __future__ import annotations

import json
import sys

CASE_ORDER = ["fwd_jvp", "fwd_jvp_bwd", "fwd", "bwd"]
PROVIDER_ORDER = ["ours", "ours_eager_rescale", "jvp_flash_attention", "flash_sdpa", "math_sdpa"]
CASE_LABEL = {
    "fwd_jvp": "fwd+JVP",
    "fwd_jvp_bwd": "fwd+JVP+bwd",
    "fwd": "fwd",
    "bwd": "bwd",
}


def _rank(order: list[str], name: str) -> int:
    return order.index(name) if name in order else len(order)


def _key(row: dict) -> tuple:
    return (_rank(CASE_ORDER, row.get("case", "")), row.get("N", 0), row.get("shape", ""),
            _rank(PROVIDER_ORDER, row.get("provider", "")), row.get("provider", ""))


def _fmt(value, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _fmt_tflops(value) -> str:
    if value is None:
        return "–"
    return f"{value:,.1f}" if value >= 1 else f"{value:.3g}"


def _speedup(baseline: float | None, median: float | None) -> str:
    if baseline is None or median is None or median <= 0:
        return "–"
    return f"{baseline / median:.2f}×"


def format_table(rows: list[dict], skipped: list[dict] | None = None) -> str:
    """One markdown table from benchmark records (dicts with the ``extra_info`` keys)."""
    skipped = skipped or []
    medians: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row.get("median_ms") is not None:
            medians.setdefault((row["case"], row["shape"]), {})[row["provider"]] = row["median_ms"]
    has_flash = any("flash_sdpa" in group for group in medians.values())
    has_device = any(row.get("device_ms") is not None for row in rows)

    header = ["case", "provider", "shape", "median ms", *(["device ms"] if has_device else []),
              "TFLOP/s", "peak MiB", "speedup vs math SDPA"]
    if has_flash:
        header.append("speedup vs flash SDPA")
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for row in sorted([*rows, *skipped], key=_key):
        provider = row.get("backend") or row["provider"]
        case = CASE_LABEL.get(row["case"], row["case"])
        cells = [case, provider, row["shape"]]
        if "skipped" in row:
            cells += [f"skipped: {row['skipped']}", "–", "–", "–"] + (["–"] if has_device else [])
            if has_flash:
                cells.append("–")
        else:
            group = medians.get((row["case"], row["shape"]), {})
            median = row.get("median_ms")
            cells.append(_fmt(median, 3 if (median or 0) >= 1 else 4))
            if has_device:
                device = row.get("device_ms")
                cells.append(_fmt(device, 3 if (device or 0) >= 1 else 4))
            cells += [_fmt_tflops(row.get("tflops")),
                      _fmt(row.get("peak_mib"), 0), _speedup(group.get("math_sdpa"), median)]
            if has_flash:
                cells.append(_speedup(group.get("flash_sdpa"), median))
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def caption(env: dict | None) -> str:
    """One line naming the machine and versions, for bench/RESULTS.md."""
    if not env:
        return ""
    parts = [f"device: {env.get('device')}", f"torch {env.get('torch')}", f"triton {env.get('triton')}"]
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    parts.append(f"python {env.get('python')}")
    peer = env.get("jvp_flash_attention")
    parts.append(f"jvp_flash_attention {peer}" if peer else "jvp_flash_attention absent")
    if env.get("backend_env", "auto") != "auto":
        parts.append(f"MEANFLOW_BACKEND={env['backend_env']}")
    parts.append(env.get("date", ""))
    return "_" + " · ".join(p for p in parts if p) + "_"


def load(path: str) -> tuple[list[dict], list[dict], dict | None]:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    rows = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info") or {})
        if "case" not in info:
            continue
        if info.get("median_ms") is None and bench.get("stats", {}).get("median") is not None:
            info["median_ms"] = bench["stats"]["median"] * 1e3
            if info.get("flops"):
                info["tflops"] = info["flops"] / bench["stats"]["median"] / 1e12
        rows.append(info)
    env = (data.get("machine_info") or {}).get("meanflow_env")
    return rows, list(data.get("meanflow_skipped") or []), env


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "out/bench.json"
    try:
        rows, skipped, env = load(path)
    except (OSError, ValueError) as exc:
        print(f"cannot read {path}: {exc}", file=sys.stderr)
        return 1
    if not rows and not skipped:
        print(f"no meanflow benchmarks in {path}", file=sys.stderr)
        return 1
    text = caption(env)
    if text:
        print(text)
        print()
    print(format_table(rows, skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
