"""Integer helpers for the launchers, the grid rule the kernels share, and how they run
(interpreter, autotuning), and the device they launch on.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects whose calls
from Python cost about 5 µs each (argument unwrapping for use inside kernels); a launch makes
several, so the launchers use these plain versions instead. Inside ``@triton.jit`` code keep
``tl.cdiv``.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, TypeVar

import torch
import triton
import triton.language as tl


def cdiv(numerator: int, denominator: int) -> int:
    """⌈numerator / denominator⌉ for positive integers."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@triton.jit
def split_program_id(n_inner):
    """(inner, outer) indices of a program of a 1-D grid of n_inner · n_outer programs, inner
    fastest, as a (n_inner, n_outer) grid would order them. CUDA caps a grid's axes 1 and 2 at
    65535 programs and axis 0 at 2^31 − 1, so a batch (or batch · heads) axis, which may exceed
    65535, is folded into axis 0. outer is int64, for the offsets it scales."""
    pid = tl.program_id(0)
    return pid % n_inner, (pid // n_inner).to(tl.int64)


def interpreting() -> bool:
    """Whether these kernels run in Triton's interpreter: decided when they were defined (Triton
    reads TRITON_INTERPRET then), so a later change of the variable does not count."""
    return type(split_program_id).__name__ == "InterpretedFunction"


def autotuning() -> bool:
    """MEANFLOW_AUTOTUNE=0 pins each autotuned kernel to its first (default) configuration: fast
    start-up and reproducible tiles; the interpreter cannot benchmark, so it always pins."""
    return not interpreting() and os.environ.get("MEANFLOW_AUTOTUNE", "1") != "0"


Launcher = TypeVar("Launcher", bound=Callable)


def on_tensor_device(launcher: Launcher) -> Launcher:
    """Runs ``launcher`` with the current CUDA device set to its first argument's (a tensor).

    Triton launches on the current device and its current stream, whatever the tensors' device:
    tensors on cuda:1 while cuda:0 is current fail to launch (or read another GPU's memory).
    SDPA needs no ``torch.cuda.set_device``, so neither may a drop-in for it. The switch is
    skipped when the device is already current (the usual case: one GPU per process)."""
    @functools.wraps(launcher)
    def launch_on_device(first: torch.Tensor, *args, **kwargs):
        device = first.device
        if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
            return launcher(first, *args, **kwargs)
        with torch.cuda.device(device):
            return launcher(first, *args, **kwargs)

    return launch_on_device
