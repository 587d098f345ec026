import pytest
import torch


@pytest.fixture
def reference_one_thread(monkeypatch):
    """Whole runs of the tiny preset: the plain-torch backend on one thread (fast and
    deterministic on the CPU)."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
