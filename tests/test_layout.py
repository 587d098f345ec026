"""The repository root must not shadow installed packages.

`python -m pytest`, `python -c` and `python -m` put the current directory first on sys.path, so a
regular package (a folder with ``__init__.py``) or a module at the repository root wins over an
installed distribution of the same name. A top-level ``kernels/`` did exactly that to the Hugging
Face ``kernels`` package, which transformers requires and imports: every diffusers FLUX import
failed when run from the root. Only ``meanflow`` may be importable from there.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_only_meanflow_is_importable_from_the_repository_root():
    importable = sorted(
        p.name for p in ROOT.iterdir()
        if not p.name.startswith(".") and ((p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"))
    assert importable == ["meanflow"]


def test_kernels_import_their_installed_package_from_the_repository_root():
    """From the root, `kernels` is the installed Hugging Face package (if any), not a folder of
    ours; meanflow's own kernels live in meanflow.kernels."""
    code = ("import importlib.util, meanflow.kernels.jvp_attention as ours; spec = importlib.util.find_spec('kernels'); "
            "print(spec.origin if spec else None); print(ours.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    spec_origin, ours = out.split("\n")[:2]
    assert not spec_origin.startswith(str(ROOT) + "/kernels"), spec_origin
    assert Path(ours).resolve().is_relative_to(ROOT / "meanflow" / "kernels")
