"""The warm-up schedule (DESIGN §2, "Warm-up schedule").

- Phase A, steps [0, b_start): the discrete target only.
- Phase B, steps [b_start, b_start + phase_b_steps): discrete and differential mixed, the
  differential share rising linearly from 0 (at b_start) towards 1. Two ways to mix:
  ``"per_step"``: whole steps alternate; step j of phase B is differential exactly when
  ⌊S(j + 1)⌋ > ⌊S(j)⌋ with S(j) = Σ_{i<j} share(i), so after any number of steps the count of
  differential steps equals the accumulated share (rounded down), deterministically and without
  state; ``"per_sample"``: every step mixes, a fraction share(j) of the batch rows gets the
  differential target (:meth:`Objective.mask`).
- Phase C, from b_start + phase_b_steps on: differential only, plus alignment (if enabled).

b_start is ``phase_a_steps`` when ``switch="steps"`` (default). With ``switch="loss"`` phase A
ends earlier, once the discrete loss has dropped by a given factor: the running mean of the last
``loss_window`` observed losses has stayed below ``loss_threshold`` × the reference (the mean of
the first ``loss_window`` observations) for ``loss_patience`` consecutive observations;
``phase_a_steps`` is then an upper bound. The criterion is relative because the loss's scale
depends on the latents (the trainer observes the unweighted mean squared error per element: the
adaptive-weighted loss sits near 1 whatever the error). Losses are observed with
:meth:`WarmupSchedule.observe` (only phase A's count). ``state_dict``/``load_state_dict`` make it
resumable.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from torch import Tensor

from . import draws
from ._util import choice

PHASES = ("A", "B", "C")


@dataclass
class ScheduleConfig:
    """Options of :class:`WarmupSchedule`.

    Attributes:
        phase_a_steps: length of phase A (default 1000); with ``switch="loss"`` its maximum.
            ≥ 0 (0 skips A).
        phase_b_steps: length of phase B, the ramp of the differential share 0 → 1 (default
            1000). ≥ 0 (0 skips B).
        mixing: ``"per_step"`` (default) or ``"per_sample"``.
        switch: ``"steps"`` (default) or ``"loss"``.
        loss_threshold: phase A may end once the running-mean loss is below this fraction of
            the first window's mean (default 0.5: halved); > 0.
        loss_window: how many recent losses the running mean covers (default 50).
        loss_patience: consecutive observations below the threshold needed (default 100).
        alignment: whether phase C turns the alignment loss on (default True).
        discrete_kind: the discrete target used in phases A and B (default ``"teacher_solver"``),
            carried in the :class:`Objective` for the trainer.
    """

    phase_a_steps: int = 1000
    phase_b_steps: int = 1000
    mixing: str = "per_step"
    switch: str = "steps"
    loss_threshold: float = 0.5
    loss_window: int = 50
    loss_patience: int = 100
    alignment: bool = True
    discrete_kind: str = "teacher_solver"

    def __post_init__(self):
        for name in ("phase_a_steps", "phase_b_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
        for name in ("loss_window", "loss_patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if isinstance(self.loss_threshold, bool) or not isinstance(self.loss_threshold, (int, float)) \
                or not 0 < self.loss_threshold < float("inf"):
            raise ValueError(f"loss_threshold: expected a finite number > 0, got {self.loss_threshold!r}")
        choice(self.mixing, "mixing", ("per_step", "per_sample"))
        choice(self.switch, "switch", ("steps", "loss"))
        choice(self.discrete_kind, "discrete_kind", ("teacher_solver", "alphaflow", "split"))


@dataclass(frozen=True)
class Objective:
    """What the trainer optimises at one step.

    Attributes:
        phase: ``"A"``, ``"B"`` or ``"C"``.
        differential_fraction: share of the batch on the differential target, in [0, 1]
            (per-step mixing: exactly 0.0 or 1.0).
        alignment: whether the alignment loss is added.
        discrete_kind: which discrete target the non-differential rows use.
    """

    phase: str
    differential_fraction: float
    alignment: bool
    discrete_kind: str

    @property
    def needs_discrete(self) -> bool:
        return self.differential_fraction < 1.0

    @property
    def needs_differential(self) -> bool:
        return self.differential_fraction > 0.0

    def mask(self, batch: int, generator: draws.Generator = None, device=None) -> Tensor:
        """(B,) bool, True for the rows on the differential target: exactly
        ``round(differential_fraction * B)`` of them (of the global batch under a
        :class:`~meanflow.method.draws.RowShard`), at random positions."""
        return draws.choose_rows(batch, self.differential_fraction, generator, device)


class WarmupSchedule:
    """Answers "which objective at step n?"; see the module docstring for the phases.

    Args:
        config: a :class:`ScheduleConfig` (default one if None).
    """

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config or ScheduleConfig()
        self._b_start: int | None = None if self.config.switch == "loss" else self.config.phase_a_steps
        self._losses: deque = deque(maxlen=self.config.loss_window)
        self._below = 0
        self._reference: float | None = None  # the first full window's mean

    @property
    def b_start(self) -> int:
        """The first step of phase B (so far: the loss criterion may still move it earlier)."""
        return self.config.phase_a_steps if self._b_start is None else self._b_start

    def share(self, step: int) -> float:
        """The differential share at ``step``: 0 in A, (step − b_start)/phase_b_steps in B, 1 in C."""
        j = step - self.b_start
        if j < 0:
            return 0.0
        if j >= self.config.phase_b_steps:
            return 1.0
        return j / self.config.phase_b_steps

    def _cumulative(self, j: int) -> int:
        # ⌊S(j)⌋ with S(j) = Σ_{i<j} i/L = j(j − 1)/(2L), in integers.
        return (j * (j - 1)) // (2 * self.config.phase_b_steps)

    def objective(self, step: int) -> Objective:
        """The :class:`Objective` for training step ``step`` (an int ≥ 0)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: expected an int >= 0, got {step!r}")
        cfg = self.config
        j = step - self.b_start
        if j < 0:
            return Objective("A", 0.0, False, cfg.discrete_kind)
        if j >= cfg.phase_b_steps:
            return Objective("C", 1.0, cfg.alignment, cfg.discrete_kind)
        if cfg.mixing == "per_sample":
            return Objective("B", self.share(step), False, cfg.discrete_kind)
        differential = self._cumulative(j + 1) > self._cumulative(j)
        return Objective("B", 1.0 if differential else 0.0, False, cfg.discrete_kind)

    def observe(self, step: int, loss: float) -> None:
        """Record the loss of ``step`` (a float or a 0-d tensor); only matters with
        ``switch="loss"`` while in phase A. When the criterion is met at ``step``, phase B starts
        at ``step + 1``."""
        if self._b_start is not None or step >= self.b_start:
            return
        loss = float(loss)
        self._losses.append(loss)
        if len(self._losses) < self.config.loss_window:
            return
        mean = sum(self._losses) / len(self._losses)
        if self._reference is None:
            self._reference = mean
            return
        self._below = self._below + 1 if mean < self.config.loss_threshold * self._reference else 0
        if self._below >= self.config.loss_patience:
            self._b_start = min(step + 1, self.config.phase_a_steps)

    def state_dict(self) -> dict:
        """Plain-Python state (picklable, JSON-able) for checkpoints."""
        return {"b_start": self._b_start, "losses": list(self._losses), "below": self._below,
                "reference": self._reference}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        try:
            b_start, losses, below = state["b_start"], state["losses"], state["below"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"state: expected the keys b_start, losses, below ({err})") from None
        if self.config.switch == "steps":
            b_start = self.config.phase_a_steps
        self._b_start = b_start
        self._losses = deque((float(x) for x in losses), maxlen=self.config.loss_window)
        self._below = int(below)
        reference = state.get("reference")  # (absent from checkpoints of the absolute criterion)
        self._reference = None if reference is None else float(reference)
