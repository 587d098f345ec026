"""Small shared helpers of ``meanflow.method``: per-sample broadcasting and argument checks."""
from __future__ import annotations

import torch
from torch import Tensor


def per_sample(x: Tensor, like: Tensor) -> Tensor:
    """View a (B,) tensor as (B, 1, ..., 1) so it broadcasts against ``like`` (B, ...).

    The dtype is ``like``'s, so per-sample times multiply latents without promotion.
    """
    return x.to(like.dtype).reshape(x.shape[0], *([1] * (like.dim() - 1)))


def as_times(x, batch: int, like: Tensor, name: str) -> Tensor:
    """A time argument as a (B,) tensor on ``like``'s device, in ``like``'s dtype.

    Accepts a float, a 0-d tensor or a (B,) tensor; raises ``ValueError`` naming ``name``
    otherwise.
    """
    if not isinstance(x, Tensor):
        x = torch.tensor(float(x))
    if x.dim() == 0:
        x = x.expand(batch)
    if x.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},) (or a scalar), got {tuple(x.shape)}")
    return x.to(device=like.device, dtype=like.dtype)


def check_rt(r: Tensor, t: Tensor) -> None:
    """Raises ``ValueError`` unless r and t are equally shaped and r <= t (elementwise)."""
    if r.shape != t.shape:
        raise ValueError(f"r: expected the shape of t {tuple(t.shape)}, got {tuple(r.shape)}")
    if bool((r > t).any()):
        raise ValueError("r: expected r <= t for every sample")


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def unit_interval(value, name: str, *, open_left: bool = False, open_right: bool = False) -> float:
    value = float(value)
    lo_ok = value > 0 if open_left else value >= 0
    hi_ok = value < 1 if open_right else value <= 1
    if not (lo_ok and hi_ok):
        lo = "(" if open_left else "["
        hi = ")" if open_right else "]"
        raise ValueError(f"{name}: expected a value in {lo}0, 1{hi}, got {value!r}")
    return value


def choice(value, name: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")
    return value
