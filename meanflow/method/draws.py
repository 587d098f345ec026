"""Random draws of the method, the same whether a batch is on one process or split over ranks.

Every function of :mod:`meanflow.method` that draws takes a ``generator``: a
``torch.Generator`` (or None for torch's default), or a :class:`RowShard` when the batch is
split over ranks. A :class:`RowShard` wraps a generator that every rank holds in the same
state; per-sample draws are made for the whole global batch and each rank keeps its own rows.
So every rank consumes the same random stream as one process running the whole batch, and a
sharded run repeats an unsharded one (to float rounding of the reductions).

Draws come in two kinds:

- per-sample (one value per row of the batch, e.g. the times of each sample): :func:`rand`,
  :func:`randn`, :func:`randint` with the batch dimension ``batch_dim`` of ``shape`` holding
  the *local* row count, and :func:`choose_rows` (a random subset of a fixed fraction of rows);
- shared (one value for the whole step, e.g. the alignment stage): draw from
  :func:`shared_generator` with torch's functions.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["RowShard", "Generator", "rand", "randn", "randint", "choose_rows", "total_rows", "shared_generator"]


@dataclass(frozen=True)
class RowShard:
    """Rows ``[start, start + rows)`` of a global batch of ``total`` rows, with the generator
    every rank shares.

    Attributes:
        generator: the shared ``torch.Generator`` (same seed and same draws on every rank).
        start: this rank's first row in the global batch.
        rows: this rank's row count.
        total: the global batch size.
    """

    generator: torch.Generator
    start: int
    rows: int
    total: int

    def __post_init__(self):
        if not (0 <= self.start and 0 < self.rows and self.start + self.rows <= self.total):
            raise ValueError(f"RowShard: rows [{self.start}, {self.start + self.rows}) do not lie in a batch of "
                             f"{self.total}")

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def local(self) -> slice:
        """This rank's rows as a slice of the global batch."""
        return slice(self.start, self.start + self.rows)


Generator = Union[torch.Generator, RowShard, None]


def shared_generator(generator: Generator) -> torch.Generator | None:
    """The ``torch.Generator`` behind ``generator``, for draws that are the same on every rank."""
    return generator.generator if isinstance(generator, RowShard) else generator


def _global_shape(shape: Sequence[int], generator: Generator, batch_dim: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if not isinstance(generator, RowShard):
        return shape
    if shape[batch_dim] != generator.rows:
        raise ValueError(f"shape: dimension {batch_dim} is {shape[batch_dim]}, but this rank holds "
                         f"{generator.rows} rows of the batch")
    return shape[:batch_dim] + (generator.total,) + shape[batch_dim + 1:]


def _local(x: Tensor, generator: Generator, batch_dim: int) -> Tensor:
    if not isinstance(generator, RowShard):
        return x
    return x.narrow(batch_dim, generator.start, generator.rows)


def _draw_device(generator: Generator, device) -> torch.device | None:
    return generator.device if generator is not None else device


def _per_sample(draw, shape: Sequence[int], generator: Generator, batch_dim: int, device, **kwargs) -> Tensor:
    """``draw(global shape, generator=..., device=..., **kwargs)`` on the generator's device (on
    ``device`` without a generator), this rank's rows of it, moved to ``device``."""
    full = draw(_global_shape(shape, generator, batch_dim), generator=shared_generator(generator),
                device=_draw_device(generator, device), **kwargs)
    return _local(full, generator, batch_dim).to(device)


def rand(shape: Sequence[int], generator: Generator = None, *, batch_dim: int = 0,
         dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """U[0, 1) of ``shape`` (per sample along ``batch_dim``), drawn on the generator's device
    (on ``device`` without a generator) and moved to ``device`` (default: stays there)."""
    return _per_sample(torch.rand, shape, generator, batch_dim, device, dtype=dtype)


def randn(shape: Sequence[int], generator: Generator = None, *, batch_dim: int = 0,
          dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """N(0, 1) of ``shape`` (per sample along ``batch_dim``); devices as :func:`rand`."""
    return _per_sample(torch.randn, shape, generator, batch_dim, device, dtype=dtype)


def randint(high: int, shape: Sequence[int], generator: Generator = None, *, batch_dim: int = 0,
            device=None) -> Tensor:
    """int64 uniform in {0, …, high − 1} of ``shape`` (per sample along ``batch_dim``)."""
    return _per_sample(functools.partial(torch.randint, high), shape, generator, batch_dim, device)


def total_rows(batch: int, generator: Generator = None) -> int:
    """The global batch size: ``batch`` on one process, the RowShard's total when sharded."""
    return _global_shape((batch,), generator, 0)[0]


def choose_rows(batch: int, fraction: float, generator: Generator = None, device=None) -> Tensor:
    """(batch,) bool: a uniformly random subset of exactly round(fraction · B_global) rows of the
    global batch (B_global = ``batch`` on one process), restricted to this rank's rows."""
    total = total_rows(batch, generator)
    dev = _draw_device(generator, device)
    chosen = torch.randperm(total, generator=shared_generator(generator), device=dev)[:int(round(fraction * total))]
    mask = torch.zeros(total, dtype=torch.bool, device=dev)
    mask[chosen] = True
    return _local(mask, generator, 0).to(device)
