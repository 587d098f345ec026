"""Closed-form velocity fields for Gaussian data (DESIGN §2, "Oracles for tests").

Data x ~ N(m, diag(s²)) (per element), noise ε ~ N(0, I), z_t = (1 − t)·x + t·ε. Per element,
z_t is Gaussian with

    μ_t = (1 − t)·m,    σ_t² = (1 − t)²·s² + t².

Marginal velocity. (x, ε, z_t) are jointly Gaussian, so v(z, t) = E[ε − x | z_t = z] is affine:
E[x | z] = m + (1 − t)s²/σ_t²·(z − μ_t) and E[ε | z] = t/σ_t²·(z − μ_t), hence

    v(z, t) = −m + (t − (1 − t)s²)/σ_t² · (z − μ_t)  =  μ_t' + (σ_t'/σ_t)·(z − μ_t).

Flow map. The ODE dz/dt = v keeps the standardised coordinate (z − μ_t)/σ_t constant, so

    Φ_{t→r}(z) = μ_r + (σ_r/σ_t)·(z − μ_t).

Average velocity. u(z, r, t) = (z − Φ_{t→r}(z))/(t − r). Using
σ_t² − σ_r² = (t − r)·[(t + r) − s²(2 − t − r)] and μ_t − μ_r = −(t − r)·m, the factor (t − r)
cancels:

    u(z, r, t) = −m + (z − μ_t)·[(t + r) − s²(2 − t − r)] / (σ_t·(σ_t + σ_r)),

which is smooth in (z, r, t), needs no division by t − r, and equals v(z, t) at r = t. All
functions here are differentiable (``torch.func.jvp`` works through them).

Shapes: z is (B, ...) ; r, t are (B,) (or floats / 0-d tensors); m and s broadcast against
one sample, i.e. against z.shape[1:] (scalars are fine). Results have z's shape and dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._util import as_times, per_sample


@dataclass
class GaussianOracle:
    """x ~ N(mean, diag(std²)) under z_t = (1 − t)x + tε.

    Attributes:
        mean: m, a float or a tensor broadcastable to one sample's shape.
        std: s > 0, likewise.
    """

    mean: Tensor | float = 0.0
    std: Tensor | float = 1.0

    def __post_init__(self):
        s = torch.as_tensor(self.std)
        if not bool((s > 0).all()):
            raise ValueError("std: expected every element > 0")

    def _ms(self, like: Tensor) -> tuple[Tensor, Tensor]:
        m = torch.as_tensor(self.mean, dtype=like.dtype, device=like.device)
        s = torch.as_tensor(self.std, dtype=like.dtype, device=like.device)
        return m, s

    def moments(self, t, like: Tensor) -> tuple[Tensor, Tensor]:
        """(μ_t, σ_t), each broadcast to ``like``'s (B, ...) shape; t is (B,) or a scalar."""
        t = per_sample(as_times(t, like.shape[0], like, "t"), like)
        m, s = self._ms(like)
        mu = (1 - t) * m
        sigma = torch.sqrt((1 - t) ** 2 * s ** 2 + t ** 2)
        return mu.expand_as(like), sigma.expand_as(like)

    def sample(self, t, noise: Tensor, data: Tensor) -> Tensor:
        """z_t = (1 − t)·x + t·ε for x = ``data`` and ε = ``noise`` (both (B, ...))."""
        t = per_sample(as_times(t, noise.shape[0], noise, "t"), noise)
        return (1 - t) * data + t * noise

    def data(self, shape, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
        """Draw x ~ N(m, diag(s²)) of ``shape`` (B, ...)."""
        eps = torch.randn(shape, generator=generator, dtype=dtype)
        m, s = self._ms(eps)
        return m + s * eps

    def velocity(self, z: Tensor, t) -> Tensor:
        """v(z, t) = E[ε − x | z_t = z]: (B, ...) like z."""
        t_ = per_sample(as_times(t, z.shape[0], z, "t"), z)
        m, s = self._ms(z)
        mu, sigma = self.moments(t, z)
        return -m + (t_ - (1 - t_) * s ** 2) / sigma ** 2 * (z - mu)

    def flow_map(self, z: Tensor, r, t) -> Tensor:
        """Φ_{t→r}(z) = μ_r + (σ_r/σ_t)(z − μ_t): the ODE solution at time r from z at t."""
        mu_t, sig_t = self.moments(t, z)
        mu_r, sig_r = self.moments(r, z)
        return mu_r + sig_r / sig_t * (z - mu_t)

    def average_velocity(self, z: Tensor, r, t) -> Tensor:
        """u(z, r, t) = (z − Φ_{t→r}(z))/(t − r), in the cancelled form (exact at r = t)."""
        b = z.shape[0]
        r_ = per_sample(as_times(r, b, z, "r"), z)
        t_ = per_sample(as_times(t, b, z, "t"), z)
        m, s = self._ms(z)
        mu_t, sig_t = self.moments(t, z)
        _, sig_r = self.moments(r, z)
        return -m + (z - mu_t) * ((t_ + r_) - s ** 2 * (2 - t_ - r_)) / (sig_t * (sig_t + sig_r))

    def __call__(self, z: Tensor, r, t) -> Tensor:
        """Alias of :meth:`average_velocity`, so the oracle is itself a student ``u(z, r, t)``."""
        return self.average_velocity(z, r, t)
