"""Backend selection (``meanflow.ops.dispatch``): MEANFLOW_BACKEND and the devices each backend runs on."""
from __future__ import annotations

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
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(torch.device(device)) == expected


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_triton_refuses_devices_it_cannot_run_on(monkeypatch, device):
    """Meta tensors (no data) and other accelerators are refused before any kernel launch."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    with pytest.raises(ValueError, match=f"runs on CUDA tensors .* got {device} tensors"):
        resolve_backend(torch.device(device))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend(torch.device("cpu"))


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="MEANFLOW_BACKEND must be one of"):
        resolve_backend(torch.device("cpu"))
