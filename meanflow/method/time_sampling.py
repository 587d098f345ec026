"""Time sampling for MeanFlow (DESIGN §2, "Time sampling").

(r, t) are two independent logit-normal draws, sigmoid(N(mean, std²)), sorted so r ≤ t; a
fraction of the batch (default 25 %, T2I-Distill's FLUX port; MeanFlow's ImageNet default is the
reverse, 75 % r = t) is then set to r = t, i.e. plain (instantaneous) velocity distillation on
those rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import draws
from ._util import positive_int, unit_interval


@dataclass
class TimeSamplerConfig:
    """Options of :func:`sample_times`.

    Attributes:
        mean: mean of the normal before the sigmoid (default -0.4, MeanFlow's ImageNet value).
        std: its standard deviation (default 1.0); must be > 0.
        equal_fraction: fraction of the batch with r = t (default 0.25); in [0, 1]. The number
            of such rows is ``round(equal_fraction * B)`` exactly, at random positions.
    """

    mean: float = -0.4
    std: float = 1.0
    equal_fraction: float = 0.25

    def __post_init__(self):
        if not float(self.std) > 0:
            raise ValueError(f"std: expected a positive value, got {self.std!r}")
        unit_interval(self.equal_fraction, "equal_fraction")


def logit_normal(shape, mean: float, std: float, generator: draws.Generator = None,
                 device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """sigmoid(mean + std·n), n ~ N(0, 1): a ``shape`` tensor of ``dtype`` in (0, 1), one value
    per sample along the last dimension."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = draws.randn(shape, generator, batch_dim=len(shape) - 1, dtype=torch.float64, device=device)
    return torch.sigmoid(mean + std * n).to(device=device, dtype=dtype)


def sample_times(batch: int, config: TimeSamplerConfig | None = None,
                 generator: draws.Generator = None, device=None,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Draw (r, t) for one batch.

    Args:
        batch: B, the number of samples (positive int).
        config: the distribution (default :class:`TimeSamplerConfig`).
        generator: a ``torch.Generator`` for reproducible draws (its device is used to draw;
            the results are moved to ``device``), or a :class:`~meanflow.method.draws.RowShard`
            (then B is this rank's row count, and the equal rows are chosen in the global batch).
        device: device of the results (default: the generator's, else the default device).
        dtype: floating dtype of the results (default float32; the student's time path runs in
            fp32).

    Returns:
        r, t: (B,) tensors of ``dtype`` in (0, 1) with r ≤ t; exactly
        ``round(config.equal_fraction * B)`` rows have r == t.
    """
    positive_int(batch, "batch")
    config = config or TimeSamplerConfig()
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
    pair = logit_normal((2, batch), config.mean, config.std, generator, device, torch.float64)
    r, t = pair.min(dim=0).values, pair.max(dim=0).values
    if round(config.equal_fraction * draws.total_rows(batch, generator)):  # no draw when none are equal
        r = torch.where(draws.choose_rows(batch, config.equal_fraction, generator, device=t.device), t, r)
    return r.to(dtype), t.to(dtype)
