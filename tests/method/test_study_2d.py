"""Smoke test of the 2-D study script (bench/study_2d.py) with its --quick settings."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "study_2d.py"


def _load():
    spec = importlib.util.spec_from_file_location("study_2d", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_study_2d_quick_writes_report_and_finite_metrics(tmp_path):
    study = _load()
    payload = study.main(["--out", str(tmp_path), "--quick", "--seeds", "0", "1"])
    for name in ("report.md", "results.json", "samples.png", "losses.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seeds"] == [0, 1]
    names = set(saved["summary"])
    for method in study.METHODS:
        assert {f"{method}@1", f"{method}@2"} <= names
    assert {"teacher@1", "teacher@2", "data"} <= names
    for name, metrics in payload["summary"].items():
        for key in ("swd", "coverage", "between"):
            assert math.isfinite(metrics[key]["mean"]) and math.isfinite(metrics[key]["std"]), (name, key)
        assert 0.0 <= metrics["coverage"]["mean"] <= 1.0 and 0.0 <= metrics["between"]["mean"] <= 1.0
    assert "| (c) warm-up + alignment | 1 |" in (tmp_path / "report.md").read_text()
