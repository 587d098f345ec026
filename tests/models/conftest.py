"""Fixtures shared by the FLUX tests."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: intra-op threads buy nothing, and on a busy 2-core machine
    # OpenMP's spinning made each small GEMM ~20x slower than a single thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    # `.to(float64)` on a diffusers model logs a warning about float32 modules; not our concern.
    logging = pytest.importorskip("diffusers.utils").logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(level)
