"""MeanFlow regression targets (DESIGN §2, "Differential target" and "Discrete target").

Conventions (FLUX): t = 1 noise, t = 0 data, z_t = (1 − t)·x + t·ε, r ≤ t. The student
u(z, r, t) predicts the average velocity over [r, t]; a step is z_r = z_t − (t − r)·u.

Shapes and dtypes, for every function here:
    z, v, u, targets: (B, ...) latents, one floating dtype (the latents').
    r, t:             (B,) times, any floating dtype (cast to z's dtype where they scale z);
                      r ≤ t is required.
Callables (bind the prompt conditioning and guidance with a lambda or functools.partial):
    velocity(z, t) -> (B, ...)             the (guided) teacher velocity v_T^g.
    student(z, r, t) -> (B, ...)           u_θ; called under ``torch.no_grad`` where the target
                                           needs it.
    pair(z, r, t, z_dot, r_dot, t_dot) -> (u, u_dot)   a ``forward_with_tangent``-style call.

Every target is returned detached (``requires_grad=False``): it sits under sg[·]. Rows with
t = r never divide by zero: the discrete targets fall back to v there (plain velocity
distillation, DESIGN §2; the limit t − r → 0 of ``teacher_solver``, while ``alphaflow`` and
``split`` would tend to the student's own velocity), and the differential target's JVP term is
multiplied by t − r = 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import draws
from ._util import check_rt, choice, per_sample, positive_int, unit_interval

DISCRETE_KINDS = ("teacher_solver", "alphaflow", "split")


# --------------------------------------------------------------------------------------------
# Flow matching and the differential (JVP) target
# --------------------------------------------------------------------------------------------

def flow_matching_target(v: Tensor) -> Tensor:
    """u_tgt = v (the r = t target; also the α = 1 AlphaFlow target): (B, ...) detached."""
    return v.detach()


def tangent_along_v(student: Callable, z: Tensor, r: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(u, du/dt) with ``torch.func.jvp`` of any callable u(z, r, t) along (ż, ṙ, ṫ) = (v, 0, 1).

    Args:
        student: u(z, r, t) -> (B, ...).
        z, v: (B, ...); r, t: (B,).

    Returns:
        u: (B, ...) the primal output (keeps whatever autograd history ``torch.func.jvp``
            gives it; use :func:`tangent_along_v_pair` for a memory-lean differentiable u).
        du_dt: (B, ...) detached.
    """
    check_rt(r, t)
    u, du = torch.func.jvp(student, (z, r, t), (v.to(z.dtype), torch.zeros_like(r), torch.ones_like(t)))
    return u, du.detach()


def tangent_along_v_pair(pair: Callable, z: Tensor, r: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(u, du/dt) from a pair-mode callable, e.g. ``FluxStudent.forward_with_tangent`` with the
    conditioning bound: ``pair(z, r, t, v, 0, 1)``.

    Returns u (differentiable) and du/dt (detached), both (B, ...).
    """
    check_rt(r, t)
    u, du = pair(z, r, t, v.to(z.dtype), torch.zeros_like(r), torch.ones_like(t))
    return u, du.detach()


def differential_target(v: Tensor, r: Tensor, t: Tensor, du_dt: Tensor) -> Tensor:
    """MeanFlow's u_tgt = v − clip(t − r, 0, 1)·sg[du/dt], (B, ...) detached.

    Args:
        v: (B, ...) the (guided) target velocity at (z_t, t); also the JVP's z tangent.
        r, t: (B,).
        du_dt: (B, ...) d/dt u_θ(z_t, r, t) along (v, 0, 1).
    """
    check_rt(r, t)
    if du_dt.shape != v.shape:
        raise ValueError(f"du_dt: expected the shape of v {tuple(v.shape)}, got {tuple(du_dt.shape)}")
    h = per_sample((t - r).clamp(0, 1), v)
    return (v - h * du_dt).detach()


# --------------------------------------------------------------------------------------------
# Discrete targets
# --------------------------------------------------------------------------------------------

@dataclass
class DiscreteTargetConfig:
    """Options of the discrete (warm-up) target.

    Attributes:
        kind: ``"teacher_solver"`` (default; no student term), ``"alphaflow"`` or ``"split"``.
        solver_steps: K, the teacher ODE steps from t to r for ``teacher_solver`` (default 4).
        solver: ``"euler"`` or ``"heun"`` (default ``"heun"``: second order, two teacher calls
            per step; the first call reuses v).
        alpha: α in (0, 1] for ``alphaflow``, the teacher step's share of t − r (default 0.5).
        split_lambda: λ in (0, 1) for ``split``: s = t − λ(t − r); ``None`` (default) draws
            λ ~ U(0, 1) per sample from the generator.
    """

    kind: str = "teacher_solver"
    solver_steps: int = 4
    solver: str = "heun"
    alpha: float = 0.5
    split_lambda: float | None = None

    def __post_init__(self):
        choice(self.kind, "kind", DISCRETE_KINDS)
        positive_int(self.solver_steps, "solver_steps")
        choice(self.solver, "solver", ("euler", "heun"))
        unit_interval(self.alpha, "alpha", open_left=True)
        if self.split_lambda is not None:
            unit_interval(self.split_lambda, "split_lambda", open_left=True, open_right=True)


def _safe_ratio(num: Tensor, h: Tensor, fallback: Tensor) -> Tensor:
    """num / h per sample, with ``fallback`` where h == 0 (no division by zero, no NaN)."""
    hb = per_sample(h, num)
    zero = hb == 0
    return torch.where(zero, fallback, num / torch.where(zero, torch.ones_like(hb), hb))


def _teacher_steps(velocity: Callable, z: Tensor, r: Tensor, t: Tensor, steps: int, solver: str,
                   v: Tensor | None) -> tuple[Tensor, Tensor]:
    """(Φ_T(z; t → r), the mean of the K step slopes), both (B, ...) in z's dtype.

    The mean slope equals (z − Φ_T)/(t − r) exactly in real arithmetic, but is accumulated from
    the velocities themselves: the quotient cancels the digits of z that a short interval does
    not move (float32: ~1e-2 error at t − r ≈ 1e-5; bfloat16: O(1) at t − r ≈ 1e-2).
    """
    positive_int(steps, "steps")
    choice(solver, "solver", ("euler", "heun"))
    check_rt(r, t)
    dtype = z.dtype
    dt = (t - r) / steps
    dtb = per_sample(dt, z)
    tau = t.clone()
    total = torch.zeros_like(z)
    for k in range(steps):
        f0 = v if (k == 0 and v is not None) else velocity(z, tau)
        nxt = t - (k + 1) * dt if k < steps - 1 else r
        if solver == "euler":
            slope = f0
        else:
            f1 = velocity(z - dtb * f0, nxt)
            slope = 0.5 * (f0 + f1)
        z = z - dtb * slope
        total = total + slope
        tau = nxt
    return z, (total / steps).to(dtype)


@torch.no_grad()
def teacher_flow(velocity: Callable, z: Tensor, r: Tensor, t: Tensor, steps: int,
                 solver: str = "euler", v: Tensor | None = None) -> Tensor:
    """Φ_T(z; t → r): ``steps`` uniform teacher ODE steps per sample from t down to r.

    Args:
        velocity: v(z, t) -> (B, ...).
        z: (B, ...) the state at t; r, t: (B,) with r ≤ t.
        steps: K ≥ 1; solver: ``"euler"`` (K calls) or ``"heun"`` (2K calls, 2K − 1 when ``v``
            is given).
        v: optionally velocity(z, t), already computed (saves one call).

    Returns:
        (B, ...) in z's dtype; equal to z on rows with r = t.
    """
    return _teacher_steps(velocity, z, r, t, steps, solver, v)[0]


@torch.no_grad()
def teacher_solver_target(velocity: Callable, z: Tensor, r: Tensor, t: Tensor, steps: int = 4,
                          solver: str = "heun", v: Tensor | None = None) -> Tensor:
    """u_tgt = (z_t − Φ_T(z_t; t → r))/(t − r), v on rows with r = t: (B, ...) detached.

    Computed as the mean of the solver's step slopes (the same value without the cancellation
    of z_t − Φ_T on short intervals). Args as :func:`teacher_flow`; ``v`` (= velocity(z, t)) is
    computed when not given.
    """
    if v is None:
        v = velocity(z, t)
    _, mean_slope = _teacher_steps(velocity, z, r, t, steps, solver, v)
    return torch.where(per_sample(t - r, z) == 0, v.to(z.dtype), mean_slope).detach()


@torch.no_grad()
def alphaflow_target(student: Callable, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                     alpha: float = 0.5) -> Tensor:
    """AlphaFlow's discrete target: one teacher step of Δ = α(t − r), then the student.

        u_tgt = [Δ·v + (t − Δ − r)·u_θ(z_t − Δ·v, r, t − Δ)] / (t − r),

    v on rows with r = t. α = 1 is flow matching to the teacher (v). As α → 0 the target tends
    to sg(u_θ) itself; what recovers the differential target is its direction: (u_tgt − u_θ)/α
    → u_diff − u_θ, so the regression residual shrinks in proportion to α.

    Args:
        student: u(z, r, t) (called without gradient). z, v: (B, ...); r, t: (B,).
        alpha: α in (0, 1].
    Returns:
        (B, ...) detached.
    """
    unit_interval(alpha, "alpha", open_left=True)
    check_rt(r, t)
    h = t - r
    delta = alpha * h
    # The student is evaluated at (r, t − Δ); on r = t rows it sees (t, t), which is harmless.
    t_mid = torch.maximum(t - delta, r)
    u_next = student(z - per_sample(delta, z) * v, r, t_mid)
    num = per_sample(delta, z) * v + per_sample(t_mid - r, z) * u_next
    return _safe_ratio(num, h, v).detach()


@torch.no_grad()
def split_target(student: Callable, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                 lam: Tensor | float) -> Tensor:
    """SplitMeanFlow interval splitting at s = t − λ(t − r):

        u2 = u_θ(z_t, s, t),  z_s = z_t − (t − s)·u2,  u1 = u_θ(z_s, r, s),
        u_tgt = ((s − r)·u1 + (t − s)·u2)/(t − r) = (1 − λ)·u1 + λ·u2,

    v on rows with r = t (where the identity says nothing). With the exact average velocity it
    is exact for every λ. As λ → 0 (s → t) it tends to the student's own u_θ(z_t, r, t), and
    (u_tgt − u_θ)/λ → (differential target − u_θ) with the student's r = t velocity as the
    tangent: small λ gives the differential target's direction with a step shrunk by λ.

    Args:
        student: u(z, r, t) (called without gradient). z, v: (B, ...); r, t: (B,).
        lam: λ, a float in (0, 1) or a (B,) tensor of them.
    Returns:
        (B, ...) detached.
    """
    check_rt(r, t)
    if not isinstance(lam, Tensor):
        unit_interval(lam, "lam", open_left=True, open_right=True)
        lam = torch.full_like(t, float(lam))
    elif lam.shape != t.shape or bool(((lam <= 0) | (lam >= 1)).any()):
        raise ValueError(f"lam: expected a ({t.shape[0]},) tensor of values in (0, 1)")
    lam = lam.to(t.dtype)
    s = t - lam * (t - r)
    u2 = student(z, s, t)
    z_s = z - per_sample(t - s, z) * u2
    u1 = student(z_s, r, s)
    lb = per_sample(lam, z)
    out = (1 - lb) * u1 + lb * u2
    return torch.where(per_sample(t - r, z) == 0, v, out).detach()


def discrete_target(config: DiscreteTargetConfig, *, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                    velocity: Callable | None = None, student: Callable | None = None,
                    generator: draws.Generator = None, teacher_v: Tensor | None = None) -> Tensor:
    """The configured discrete target, (B, ...) detached.

    ``teacher_solver`` needs ``velocity``; ``alphaflow`` and ``split`` need ``student``. ``v``
    is the target velocity at (z, t): the guided teacher velocity, or its ω/κ mix with the
    student's own predictions (DESIGN §2), which ``alphaflow`` and ``split`` use.
    ``teacher_solver`` solves the teacher's ODE alone ("no student term"): it reads
    ``teacher_v`` = velocity(z, t), default ``v`` (the same tensor when nothing is mixed).
    ``generator`` draws split's λ when ``config.split_lambda`` is None.
    """
    if config.kind == "teacher_solver":
        if velocity is None:
            raise ValueError("velocity: the teacher_solver target needs the teacher velocity callable")
        return teacher_solver_target(velocity, z, r, t, config.solver_steps, config.solver,
                                     v=v if teacher_v is None else teacher_v)
    if student is None:
        raise ValueError(f"student: the {config.kind} target needs the student callable")
    if config.kind == "alphaflow":
        return alphaflow_target(student, z, r, t, v, config.alpha)
    lam = config.split_lambda
    if lam is None:
        lam = draws.rand(t.shape, generator, dtype=torch.float64, device=t.device)
        # Clamp again in t's dtype: 1 − 1e-6 rounds to 1.0 in bfloat16 / float16 (1 − eps/2 is
        # the largest value below 1 there; a no-op for float32 / float64).
        lam = lam.clamp(1e-6, 1 - 1e-6).to(t.dtype).clamp(max=1 - torch.finfo(t.dtype).eps / 2)
    return split_target(student, z, r, t, v, lam)
