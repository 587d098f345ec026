"""Trajectory distribution alignment (DESIGN §2, "TDA"), for any callables.

1. Roll out the student's K-step sampler from noise along the grid τ_0 = 1 > … > τ_K = 0,
   without gradient up to one randomly chosen stage k (backward simulation).
2. From that stage's point z_k, the student's clean estimate with gradient (a jump to r = 0):
   x̂ = z_k − τ_k·u_θ(z_k, 0, τ_k).
3. Re-noise x̂ (detached) to t′: x_t′ = (1 − t′)·x̂ + t′·ε, with t′ drawn uniformly inside the
   stage's window (τ_{k+1}, τ_k] (``window="stage"``, TDM's sampling-step-aware choice) or in
   (t_min, t_max] (``window="global"``).
4. x̂0 = x_t′ − t′·v from the fake velocity net v_φ and from the guided teacher (no gradient);
   g = (x̂0_fake − x̂0_teacher) / max(mean|x̂ − x̂0_teacher|, eps) per sample.
5. L_align = mean_b ½‖x̂_b − sg(x̂_b − g_b)‖² through the fused ``meanflow.ops.alignment_loss``:
   its gradient with respect to x̂ is exactly g/B (g per sample).
6. v_φ starts as a copy of the teacher (:func:`make_fake_velocity`) and is trained by flow
   matching on the student's detached samples (:func:`fake_flow_matching_loss`) on its own
   optimizer, ``fake_updates_per_student_step`` times per student update (the trainer's loop).

The total student loss is L_MeanFlow + ``weight``·L_align. Callables follow
:mod:`meanflow.method.sampler`: student u(z, r, t[, cond]), teacher / fake v(x, t[, cond]) with
r, t (B,) tensors in float32 (float64 for float64 latents); ``cond`` is passed through when it is
not None. Wrap a :class:`~meanflow.method.guidance.GuidedTeacher` (with its uncond / scale) in a
closure. :func:`make_fake_velocity` makes a full trainable copy; the trainer can instead train
low-rank adapters over a frozen copy (``model.fake_lora_rank``, :mod:`meanflow.models.lora`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from meanflow.ops.alignment_loss import DEFAULT_EPS, alignment_loss

from . import draws
from ._util import choice, per_sample, positive_int
from .sampler import SamplerConfig, time_grid

WINDOWS = ("stage", "global")


@dataclass
class AlignmentConfig:
    """Options of trajectory distribution alignment.

    Attributes:
        steps: K, the student's sampler steps along which alignment happens (default 2; the
            paper targets 1–2 steps).
        weight: λ_align in L_MeanFlow + λ_align·L_align (default 1.0; no published value: tune
            it, the per-element gradient of L_align is O(1/B) while MeanFlow's adaptive loss
            gives O(1/(B·√N))).
        window: ``"stage"`` (default): t′ ~ U(τ_{k+1}, τ_k]; ``"global"``: t′ ~ U(t_min, t_max].
        t_min, t_max: the global window (defaults 0.02, 0.98); also the fake network's flow
            matching times when none are given.
        fake_updates_per_student_step: optimizer steps of v_φ per student step (default 5, the
            two-time-scale ratio of DMD2; rCM updates the student every 5th–10th iteration).
        eps: floor of the per-sample denominator of g (default 1e-4, see ``alignment_loss``).
    """

    steps: int = 2
    weight: float = 1.0
    window: str = "stage"
    t_min: float = 0.02
    t_max: float = 0.98
    fake_updates_per_student_step: int = 5
    eps: float = DEFAULT_EPS

    def __post_init__(self):
        positive_int(self.steps, "steps")
        positive_int(self.fake_updates_per_student_step, "fake_updates_per_student_step")
        choice(self.window, "window", WINDOWS)
        if not (float(self.weight) >= 0):
            raise ValueError(f"weight: expected a number >= 0, got {self.weight!r}")
        if not (0.0 <= float(self.t_min) < float(self.t_max) <= 1.0):
            raise ValueError(f"t_min, t_max: expected 0 <= t_min < t_max <= 1, "
                             f"got {self.t_min!r}, {self.t_max!r}")
        if not (float(self.eps) > 0):
            raise ValueError(f"eps: expected a number > 0, got {self.eps!r}")


@dataclass
class AlignmentOutput:
    """What one alignment evaluation produced.

    Attributes:
        loss: L_align (scalar), differentiable with respect to the student through x̂.
        per_sample: ½‖g_b‖² (B,), for logging.
        x_hat: x̂ (B, ...), the student's clean estimate at the chosen stage, with gradient.
        stage: k, the chosen stage (0 ≤ k < K).
        t: t′ (B,), the re-noising times.
        x_t: x_t′ (B, ...), the re-noised point (detached).
        noise: ε (B, ...), the re-noising noise (reusable for the fake network's update).
        x0_fake, x0_teacher: the two clean estimates at x_t′ (detached).
    """

    loss: Tensor
    per_sample: Tensor
    x_hat: Tensor
    stage: int
    t: Tensor
    x_t: Tensor
    noise: Tensor
    x0_fake: Tensor
    x0_teacher: Tensor


def _call(fn: Callable, cond: Any, *args):
    return fn(*args) if cond is None else fn(*args, cond)


def _time_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _randn_like(x: Tensor, generator: draws.Generator) -> Tensor:
    """N(0, I) shaped like x (per sample along dim 0), drawn on the generator's device (then
    moved to x's)."""
    return draws.randn(x.shape, generator, dtype=x.dtype, device=x.device)


def _check_grid(grid, steps: int | None = None) -> Tensor:
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.dim() != 1 or grid.numel() < 2 or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("grid: expected a strictly decreasing 1-d time grid with at least 2 points")
    if steps is not None and grid.numel() != steps + 1:
        raise ValueError(f"grid: expected steps + 1 = {steps + 1} points, got {grid.numel()}")
    return grid


def default_grid(config: AlignmentConfig) -> Tensor:
    """The uniform grid of ``config.steps`` steps (pass your own, e.g. FLUX-shifted, to override)."""
    return time_grid(SamplerConfig(steps=config.steps))


def choose_stage(steps: int, generator: draws.Generator = None) -> int:
    """k uniform in {0, …, steps − 1} (one for the whole batch, the same on every rank)."""
    return int(torch.randint(positive_int(steps, "steps"), (1,), generator=draws.shared_generator(generator)).item())


def rollout(student: Callable, noise: Tensor, grid, stage: int, cond: Any = None) -> tuple[Tensor, Tensor]:
    """Steps 1–2: (z_k, x̂). The first k sampler steps run under ``torch.no_grad``; z_k is
    detached; x̂ = z_k − τ_k·u(z_k, 0, τ_k) keeps the gradient (as the grad mode allows)."""
    grid = _check_grid(grid)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < grid.numel() - 1:
        raise ValueError(f"stage: expected an int in [0, {grid.numel() - 1}), got {stage!r}")
    b, tdtype = noise.shape[0], _time_dtype(noise)

    def full(value: float) -> Tensor:
        return torch.full((b,), value, dtype=tdtype, device=noise.device)

    z = noise
    with torch.no_grad():
        for j in range(stage):
            hi, lo = float(grid[j]), float(grid[j + 1])
            z = z - (hi - lo) * _call(student, cond, z, full(lo), full(hi)).to(z.dtype)
    z = z.detach()
    tau = float(grid[stage])
    x_hat = z - tau * _call(student, cond, z, full(0.0), full(tau)).to(z.dtype)
    return z, x_hat


def renoise_times(batch: int, config: AlignmentConfig, grid=None, stage: int | None = None, *,
                  generator: draws.Generator = None, device=None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Step 3's t′ (B,): uniform in (τ_{k+1}, τ_k] for ``window="stage"`` (needs grid and stage),
    uniform in (t_min, t_max] for ``"global"``."""
    if config.window == "stage":
        if grid is None or stage is None:
            raise ValueError("stage: the stage window needs the grid and the stage")
        grid = _check_grid(grid)
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < grid.numel() - 1:
            # A negative index would pick a reversed window silently.
            raise ValueError(f"stage: expected an int in [0, {grid.numel() - 1}), got {stage!r}")
        hi, lo = float(grid[stage]), float(grid[stage + 1])
    else:
        hi, lo = float(config.t_max), float(config.t_min)
    u = draws.rand((batch,), generator, dtype=torch.float64)  # [0, 1)
    return (hi - (hi - lo) * u).to(device=device, dtype=dtype)  # (lo, hi]


def renoise(x: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = (1 − t)·x + t·ε, t (B,)."""
    tb = per_sample(t, x)
    return (1 - tb) * x + tb * noise


def clean_estimate(velocity: Callable, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
    """x̂0 = x_t − t·v(x_t, t), in x_t's dtype."""
    return x_t - per_sample(t, x_t) * _call(velocity, cond, x_t, t).to(x_t.dtype)


def trajectory_alignment(
    student: Callable,
    teacher: Callable,
    fake: Callable,
    noise: Tensor,
    config: AlignmentConfig | None = None,
    *,
    cond: Any = None,
    grid=None,
    stage: int | None = None,
    generator: draws.Generator = None,
) -> AlignmentOutput:
    """Steps 1–5: L_align for the student's rollout from ``noise``.

    Args:
        student: u_θ(z, r, t[, cond]) (average velocity).
        teacher: the guided teacher velocity v_T^g(x, t[, cond]), evaluated without gradient.
        fake: the fake velocity v_φ(x, t[, cond]), evaluated without gradient.
        noise: (B, ...) the rollout's starting noise at τ_0 = 1.
        config: an :class:`AlignmentConfig` (defaults if None).
        grid: the (K + 1,) decreasing time grid; default :func:`default_grid`.
        stage: k; default drawn uniformly (:func:`choose_stage`).
        generator: for the stage, t′ and the re-noising noise.
    """
    config = config or AlignmentConfig()
    grid = _check_grid(default_grid(config) if grid is None else grid)
    steps = grid.numel() - 1
    if stage is None:
        stage = choose_stage(steps, generator)
    _, x_hat = rollout(student, noise, grid, stage, cond)
    b = noise.shape[0]
    t = renoise_times(b, config, grid, stage, generator=generator, device=noise.device,
                      dtype=_time_dtype(noise))
    eps = _randn_like(x_hat, generator)
    with torch.no_grad():
        x_t = renoise(x_hat.detach(), t, eps)
        x0_fake = clean_estimate(fake, x_t, t, cond)
        x0_teacher = clean_estimate(teacher, x_t, t, cond)
    loss, per = alignment_loss(x_hat, x0_fake, x0_teacher, eps=config.eps)
    return AlignmentOutput(loss=loss, per_sample=per, x_hat=x_hat, stage=stage, t=t, x_t=x_t, noise=eps,
                           x0_fake=x0_fake, x0_teacher=x0_teacher)


def fake_flow_matching_loss(
    fake: Callable,
    samples: Tensor,
    config: AlignmentConfig | None = None,
    *,
    cond: Any = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: draws.Generator = None,
) -> Tensor:
    """Step 6: mean_b mean_j (v_φ(x_t, t) − (ε − x))² on the student's samples (detached).

    Args:
        fake: v_φ(x, t[, cond]) with gradient to its parameters.
        samples: (B, ...) student samples, e.g. ``AlignmentOutput.x_hat``; detached here.
        t: (B,) times; default uniform in (t_min, t_max] of ``config`` (pass
            ``AlignmentOutput.t`` to train at the alignment's own points).
        noise: (B, ...) ε; default fresh N(0, I).
    """
    config = config or AlignmentConfig()
    x = samples.detach()
    b = x.shape[0]
    if t is None:
        t = renoise_times(b, AlignmentConfig(window="global", t_min=config.t_min, t_max=config.t_max),
                          generator=generator, device=x.device, dtype=_time_dtype(x))
    if t.shape != (b,):
        raise ValueError(f"t: expected shape ({b},), got {tuple(t.shape)}")
    if noise is None:
        noise = _randn_like(x, generator)
    elif noise.shape != x.shape:
        raise ValueError(f"noise: expected the samples' shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    t = t.detach()
    x_t = renoise(x, t, noise.detach())
    v = _call(fake, cond, x_t, t)
    target = (noise - x).to(torch.promote_types(v.dtype, torch.float32))
    return (v.to(target.dtype) - target).square().reshape(b, -1).mean(1).mean()


def make_fake_velocity(teacher: torch.nn.Module) -> torch.nn.Module:
    """v_φ's initial state: a deep copy of the teacher module with every parameter trainable
    and in train mode (the teacher itself is left untouched). A full copy; for adapters over a
    frozen copy see :func:`meanflow.models.lora.add_lora_to_flux_blocks`."""
    if not isinstance(teacher, torch.nn.Module):
        raise ValueError(f"teacher: expected a torch.nn.Module, got {type(teacher).__name__}")
    fake = copy.deepcopy(teacher)
    fake.requires_grad_(True)
    fake.train()
    return fake
