"""Host-side integer helpers for the launchers.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects whose calls
from Python cost about 5 µs each (argument unwrapping for use inside kernels); a launch makes
several, so the launchers use these plain versions instead. Inside ``@triton.jit`` code keep
``tl.cdiv``.
"""
from __future__ import annotations


def cdiv(numerator: int, denominator: int) -> int:
    """⌈numerator / denominator⌉ for positive integers."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
