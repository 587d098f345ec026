"""The few-step sampler (DESIGN §2, "Sampling").

K steps along a time grid τ_0 = 1 > τ_1 > … > τ_K = 0:

    z ← z − (τ_k − τ_{k+1})·u(z, τ_{k+1}, τ_k[, cond]),

for any average-velocity callable u. The grid is uniform, or uniform then passed through FLUX's
resolution-dependent time shift: with the image sequence length n (packed latent tokens),

    μ = base_shift + (max_shift − base_shift)·(n − base_seq_len)/(max_seq_len − base_seq_len),
    τ' = e^μ / (e^μ + (1/τ − 1)),

which keeps 0 and 1 fixed and moves the interior towards the noise end for larger images
(FLUX's defaults: 0.5 at 256 tokens, 1.15 at 4096).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ._util import choice, positive_int


@dataclass
class SamplerConfig:
    """Options of the time grid.

    Attributes:
        steps: K ≥ 1 (default 1).
        shift: ``"none"`` (default, uniform grid) or ``"flux"`` (resolution-dependent shift;
            needs ``image_seq_len`` when building the grid) or ``"fixed"`` (μ = ``mu``).
        mu: the shift for ``"fixed"`` (default 0.0, no shift).
        base_seq_len, max_seq_len, base_shift, max_shift: FLUX's line μ(n) (defaults 256,
            4096, 0.5, 1.15, the FLUX.1 scheduler's values).
    """

    steps: int = 1
    shift: str = "none"
    mu: float = 0.0
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    def __post_init__(self):
        positive_int(self.steps, "steps")
        choice(self.shift, "shift", ("none", "flux", "fixed"))
        if self.max_seq_len == self.base_seq_len:
            raise ValueError("max_seq_len: expected a value different from base_seq_len")


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """μ(n): the line through (base_seq_len, base_shift) and (max_seq_len, max_shift) at n."""
    positive_int(image_seq_len, "image_seq_len")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def shift_times(tau: Tensor, mu: float) -> Tensor:
    """τ' = e^μ/(e^μ + (1/τ − 1)), written as e^μ·τ/(e^μ·τ + 1 − τ) so τ = 0 maps to 0."""
    a = math.exp(mu)
    return a * tau / (a * tau + (1 - tau))


def time_grid(config: SamplerConfig | None = None, image_seq_len: int | None = None) -> Tensor:
    """The grid τ_0 = 1 > … > τ_K = 0 as a (K + 1,) float64 tensor (on the CPU)."""
    config = config or SamplerConfig()
    tau = torch.linspace(1.0, 0.0, config.steps + 1, dtype=torch.float64)
    if config.shift == "flux":
        if image_seq_len is None:
            raise ValueError("image_seq_len: the flux shift needs the image sequence length")
        mu = flux_mu(image_seq_len, config.base_seq_len, config.max_seq_len, config.base_shift,
                     config.max_shift)
        tau = shift_times(tau, mu)
    elif config.shift == "fixed":
        tau = shift_times(tau, config.mu)
    tau[0], tau[-1] = 1.0, 0.0
    return tau


def sample(u: Callable, noise: Tensor, grid: Tensor | None = None, cond: Any = None, *,
           config: SamplerConfig | None = None, image_seq_len: int | None = None,
           return_trajectory: bool = False):
    """Run the K-step sampler from z = noise at τ_0 to τ_K.

    Args:
        u: u(z, r, t) -> (B, ...), or u(z, r, t, cond) when ``cond`` is not None. r, t are
            passed as (B,) tensors in float32 (float64 for float64 latents).
        noise: (B, ...) the starting point (usually ε ~ N(0, I)).
        grid: a decreasing (K + 1,) time grid; default :func:`time_grid` of ``config``.
        cond: optional conditioning passed through to u.
        return_trajectory: also return the list of the K + 1 states (z at every τ_k).

    Returns:
        z: (B, ...) the sample, in noise's dtype (and the trajectory if asked).

    Gradients flow as usual; wrap the call in ``torch.no_grad()`` for plain sampling.
    """
    if grid is None:
        grid = time_grid(config, image_seq_len)
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.dim() != 1 or grid.numel() < 2 or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("grid: expected a strictly decreasing 1-d time grid with at least 2 points")
    b = noise.shape[0]
    tdtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    z = noise
    traj = [z]
    for k in range(grid.numel() - 1):
        t_hi, t_lo = float(grid[k]), float(grid[k + 1])
        t = torch.full((b,), t_hi, dtype=tdtype, device=noise.device)
        r = torch.full((b,), t_lo, dtype=tdtype, device=noise.device)
        out = u(z, r, t) if cond is None else u(z, r, t, cond)
        z = z - (t_hi - t_lo) * out.to(z.dtype)
        traj.append(z)
    return (z, traj) if return_trajectory else z
