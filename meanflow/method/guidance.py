"""The guided teacher velocity v = v_T^g(z_t, t, c) (DESIGN §2, "Target velocity").

Two ways a teacher is guided, selected by :class:`GuidanceConfig.mode`:

- ``"embedded"`` (FLUX.1-dev, guidance-distilled): the scale g is an input of the network. g is
  drawn per sample from ``scales`` and written into the conditioning (by default
  ``dataclasses.replace(cond, guidance=g)``, which fits ``FluxCondition``); the student must be
  given the same g (use the returned conditioning).
- ``"cfg"`` (true classifier-free guidance): v = v_u + w·(v_c − v_u), two teacher calls, w drawn
  per sample from ``scales``.
- ``"none"``: v = v_T(z, t, c).

Optionally, MeanFlow's ω/κ mixing with the student's own r = t predictions (MeanFlow App. B.1,
as in the official code and T2I-Distill's FLUX port; see notes/method-sources.md §1.1):

    ṽ = ω·v + κ·u_θ(z_t, t, t | c) + (1 − ω − κ)·u_θ(z_t, t, t | ∅),

both u terms without gradient, applied only on rows with t_min ≤ t ≤ t_max (elsewhere ṽ = v).
Here v is the guided teacher velocity above (for FLUX the embedded-guidance one); the effective
extra guidance is ω/(1 − κ). ω = 1, κ = 0 (the default) turns it off. ṽ then replaces v both as
the JVP tangent and in the target. Prompt dropout (MeanFlow's 10 % with ṽ = v on dropped rows)
belongs to the data pipeline and is not done here.

Shapes: z, velocities: (B, ...) in the latents' dtype; t: (B,); scales g, w: (B,) float32.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import draws
from ._util import choice, per_sample, positive_int

MODES = ("none", "embedded", "cfg")


@dataclass
class GuidanceConfig:
    """How the teacher is guided.

    Attributes:
        mode: ``"embedded"`` (default, FLUX.1-dev), ``"cfg"`` or ``"none"``.
        scales: the set g (embedded) or w (cfg) is drawn from, uniformly per sample. Default
            (4.0, 4.5, 5.0), T2I-Distill's FLUX choice. Must be non-empty; one value in the cfg
            mode, where nothing tells the student which w a target was guided with.
        omega: MeanFlow ω (default 1.0: off together with kappa = 0).
        kappa: MeanFlow κ (default 0.0).
        t_min, t_max: the ω/κ mixing applies on rows with t_min ≤ t ≤ t_max (default [0, 1]).
    """

    mode: str = "embedded"
    scales: tuple[float, ...] = (4.0, 4.5, 5.0)
    omega: float = 1.0
    kappa: float = 0.0
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self):
        choice(self.mode, "mode", MODES)
        try:  # a bare number or a string is not a set of scales
            if isinstance(self.scales, str):
                raise TypeError
            self.scales = tuple(float(s) for s in self.scales)
        except (TypeError, ValueError):
            raise ValueError(f"scales: expected a sequence of numbers, got {self.scales!r}") from None
        if not self.scales:
            raise ValueError("scales: expected at least one guidance scale")
        if self.mode == "cfg" and len(set(self.scales)) > 1:
            # Embedded g reaches the student through its conditioning; a true-CFG w does not,
            # so several would train it on a mixture of differently guided targets.
            raise ValueError(f"scales: the cfg mode takes one guidance scale w, got {list(self.scales)}: the "
                             "student has no input for w, so it would regress onto a mixture of targets "
                             "guided with different w (the 'embedded' mode conditions the student on g)")
        if not 0.0 <= self.t_min <= self.t_max <= 1.0:
            raise ValueError(f"t_min, t_max: expected 0 <= t_min <= t_max <= 1, "
                             f"got {self.t_min}, {self.t_max}")

    @property
    def mixing(self) -> bool:
        """Whether the ω/κ mixing changes anything (ω ≠ 1 or κ ≠ 0)."""
        return self.omega != 1.0 or self.kappa != 0.0


def sample_scales(batch: int, config: GuidanceConfig, generator: draws.Generator = None,
                  device=None) -> Tensor:
    """(B,) float32 scales drawn uniformly from ``config.scales``."""
    positive_int(batch, "batch")
    idx = draws.randint(len(config.scales), (batch,), generator, device=device)
    table = torch.tensor(config.scales, dtype=torch.float32, device=idx.device)
    return table[idx].to(device)


def set_guidance(cond: Any, g: Tensor) -> Any:
    """Default way to hand g to an embedded-guidance model: ``dataclasses.replace(cond, guidance=g)``."""
    if not (dataclasses.is_dataclass(cond) and any(f.name == "guidance" for f in dataclasses.fields(cond))):
        raise ValueError("cond: expected a dataclass with a `guidance` field (or pass set_guidance=)")
    return dataclasses.replace(cond, guidance=g)


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, w: Tensor | float) -> Tensor:
    """True CFG: v_u + w·(v_c − v_u); w a float or (B,). Returns (B, ...)."""
    if v_cond.shape != v_uncond.shape:
        raise ValueError(f"v_uncond: expected the shape of v_cond {tuple(v_cond.shape)}, "
                         f"got {tuple(v_uncond.shape)}")
    if isinstance(w, Tensor):
        w = per_sample(w, v_cond)
    return v_uncond + w * (v_cond - v_uncond)


def mix_with_student(v: Tensor, u_cond: Tensor, u_uncond: Tensor, t: Tensor,
                     config: GuidanceConfig) -> Tensor:
    """MeanFlow's ṽ = ω·v + κ·u_c + (1 − ω − κ)·u_u on rows with t in [t_min, t_max], else v.

    Args:
        v: (B, ...) the (guided) teacher velocity; u_cond, u_uncond: (B, ...) the student's
            u_θ(z_t, t, t | c) and u_θ(z_t, t, t | ∅); t: (B,).
    Returns:
        (B, ...) detached.
    """
    w, k = config.omega, config.kappa
    mixed = w * v + k * u_cond + (1 - w - k) * u_uncond
    on = per_sample(((t >= config.t_min) & (t <= config.t_max)).to(v.dtype), v) > 0  # (B, 1, ...)
    return torch.where(on, mixed, v).detach()


class GuidedTeacher:
    """The guided teacher velocity v_T^g, from a plain ``velocity(z, t, cond)`` callable.

    Args:
        velocity: v_T(z, t, cond) -> (B, ...), e.g. ``FluxTeacher.velocity``.
        config: a :class:`GuidanceConfig`.
        set_guidance: ``(cond, g) -> cond`` for the embedded mode (default :func:`set_guidance`).
    """

    def __init__(self, velocity: Callable, config: GuidanceConfig | None = None,
                 set_guidance: Callable[[Any, Tensor], Any] = set_guidance):
        self.velocity = velocity
        self.config = config or GuidanceConfig()
        self.set_guidance = set_guidance

    def prepare(self, cond: Any, batch: int, generator: draws.Generator = None, device=None):
        """Draw the per-sample scales (B,) float32 and, in the embedded mode, write them into
        ``cond``. Returns (cond, scales); pass the returned cond to the student too."""
        if self.config.mode == "none":
            return cond, None
        g = sample_scales(batch, self.config, generator, device)
        if self.config.mode == "embedded":
            cond = self.set_guidance(cond, g)
        return cond, g

    @torch.no_grad()
    def __call__(self, z: Tensor, t: Tensor, cond: Any, *, uncond: Any = None,
                 scale: Tensor | float | None = None) -> Tensor:
        """v_T^g(z, t, c): (B, ...).

        ``embedded``/``none``: one call velocity(z, t, cond) (cond already carries g, see
        :meth:`prepare`). ``cfg``: needs ``uncond`` and ``scale`` (w, a float or (B,)).
        """
        if self.config.mode != "cfg":
            return self.velocity(z, t, cond)
        if uncond is None:
            raise ValueError("uncond: the cfg mode needs the unconditional conditioning")
        if scale is None:
            raise ValueError("scale: the cfg mode needs the guidance scale w")
        return cfg_combine(self.velocity(z, t, cond), self.velocity(z, t, uncond), scale)

    @torch.no_grad()
    def mixed(self, v: Tensor, student: Callable, z: Tensor, t: Tensor, cond: Any, uncond: Any) -> Tensor:
        """ṽ with the student's own r = t predictions (see :func:`mix_with_student`); returns v
        unchanged (detached) when the config's ω = 1 and κ = 0.

        Args:
            student: u(z, r, t, cond) -> (B, ...).
        """
        if not self.config.mixing:
            return v.detach()
        if uncond is None:
            raise ValueError("uncond: the omega/kappa mixing needs the unconditional conditioning")
        u_c = student(z, t, t, cond) if self.config.kappa != 0.0 else torch.zeros_like(v)
        u_u = student(z, t, t, uncond)
        return mix_with_student(v, u_c, u_u, t, self.config)
