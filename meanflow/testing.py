"""Comparison helpers shared by the tests and the GPU check.

The rule, as FlashAttention's tests use it: a kernel in a low-precision dtype may be at most
``ratio`` times further from a float64 oracle than PyTorch's own computation in that dtype,
plus a floor of the dtype's rounding level (relative to the oracle's norm, and absolute for
unit-scale values, so an oracle that is exactly zero, such as the key gradient of a single
visible key, still leaves room for rounding).
"""
from __future__ import annotations

import torch

# Absolute floors of the relative error, per dtype.
ERROR_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (NaN if either holds a NaN)."""
    actual, expected = actual.double(), expected.double()
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        return float("nan")
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_to_oracle(
    name: str,
    actual: torch.Tensor,
    oracle: torch.Tensor,
    baseline: torch.Tensor | None = None,
    ratio: float = 2.0,
    magnitude: float = 1.0,
) -> float:
    """Asserts ‖actual − oracle‖ <= ratio·‖baseline − oracle‖ + floor·(‖oracle‖ + magnitude·sqrt(numel)).

    Args:
        name: what is compared, for the message.
        actual: the result under test, any float dtype; its dtype picks the floor.
        oracle: the float64 result.
        baseline: the same computation by PyTorch in actual's dtype, or None (floor only).
        magnitude: the typical size of the intermediates the result is computed from, for
            results that cancel to (near) zero.

    Returns:
        The relative error of ``actual``.
    """
    if actual.shape != oracle.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != oracle {tuple(oracle.shape)}")
    oracle = oracle.double()
    diff = (actual.double() - oracle).norm().item()
    base = 0.0 if baseline is None else (baseline.double() - oracle).norm().item()
    bound = ratio * base + ERROR_FLOOR[actual.dtype] * (oracle.norm().item() + magnitude * oracle.numel() ** 0.5)
    if not diff <= bound:  # also catches NaN
        raise AssertionError(f"{name}: error norm {diff:.3e} > bound {bound:.3e} (baseline {base:.3e}, "
                             f"oracle norm {oracle.norm().item():.3e}, dtype {actual.dtype})")
    return relative_error(actual, oracle)
