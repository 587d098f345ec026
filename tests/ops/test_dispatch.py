"""Backend selection (``meanflow.ops.dispatch``): MEANFLOW_BACKEND and the devices each backend runs on."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from meanflow.ops.dispatch import resolve_backend


@pytest.mark.parametrize("requested, device, expected", [
    ("auto", "cpu", "reference"),
    ("auto", "meta", "reference"),
    ("auto", "cuda", "triton"),
    ("reference", "cuda", "reference"),
    ("reference", "meta", "reference"),
    ("triton", "cuda", "triton"),
    ("triton", "cpu", "triton"),  # under TRITON_INTERPRET=1
])
def test_resolves_the_requested_backend(monkeypatch, requested, device, expected):
    monkeypatch.setenv("MEANFLOW_BACKEND", requested)
    monkeypatch.setattr("meanflow.ops.dispatch.triton_interpreting", lambda: True)  # CPU tensors allowed
    assert resolve_backend(torch.device(device)) == expected


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_triton_refuses_devices_it_cannot_run_on(monkeypatch, device):
    """Meta tensors (no data) and other accelerators are refused before any kernel launch."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    with pytest.raises(ValueError, match=f"runs on CUDA tensors .* got {device} tensors"):
        resolve_backend(torch.device(device))


def test_triton_on_cpu_needs_the_interpreter():
    """Refused by name without the interpreter, also where TRITON_INTERPRET=1 is set only after
    the kernels were defined (Triton read it then: the launch used to fail inside Triton)."""
    script = """
import os, torch
os.environ.pop("TRITON_INTERPRET", None)
os.environ["MEANFLOW_BACKEND"] = "triton"
from meanflow.ops import jvp_silu
from meanflow.ops.dispatch import resolve_backend
for when in ("before", "after"):
    if when == "after":
        import meanflow.kernels.jvp_activation
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        jvp_silu(torch.randn(4))
    except ValueError as error:
        assert "TRITON_INTERPRET=1" in str(error), error
    else:
        raise AssertionError(when)
print("refused twice")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "refused twice" in done.stdout, done.stderr


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="MEANFLOW_BACKEND must be one of"):
        resolve_backend(torch.device("cpu"))


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_interpreter_variable_is_read_as_triton_reads_it(value, expected):
    """Before any kernel is defined only the variable can tell; Triton takes true / on / yes too."""
    script = "from meanflow.ops.dispatch import triton_interpreting; print(triton_interpreting())"
    env = dict(os.environ, TRITON_INTERPRET=value)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == str(expected), done.stderr
