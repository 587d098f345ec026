"""Targets against the closed-form oracle: identities and convergence orders."""
import math

import pytest
import torch

from meanflow.method import (DiscreteTargetConfig, GaussianOracle, alphaflow_target, differential_target,
                             discrete_target, flow_matching_target, split_target, tangent_along_v,
                             tangent_along_v_pair, teacher_solver_target)

D = torch.float64


def _setup(b=8, seed=0, equal_rows=True):
    g = torch.Generator().manual_seed(seed)
    orc = GaussianOracle(mean=torch.tensor([[0.5, -1.0], [1.5, 0.2]], dtype=D),
                         std=torch.tensor([[0.4, 1.3], [0.2, 0.8]], dtype=D))
    z = torch.randn(b, 2, 2, generator=g, dtype=D)
    t = torch.rand(b, generator=g, dtype=D) * 0.8 + 0.2
    r = t * torch.rand(b, generator=g, dtype=D)
    if equal_rows:
        r[:2] = t[:2]
    return orc, z, r, t


def test_differential_target_of_exact_u_is_u_jvp():
    orc, z, r, t = _setup()
    v = orc.velocity(z, t)
    u, du = tangent_along_v(orc.average_velocity, z, r, t, v)
    tgt = differential_target(v, r, t, du)
    assert not tgt.requires_grad
    assert torch.allclose(u, orc.average_velocity(z, r, t), atol=1e-14)
    assert torch.allclose(tgt, u, atol=1e-12)


def test_differential_target_of_exact_u_is_u_pair_mode():
    orc, z, r, t = _setup()

    def pair(z, r, t, z_dot, r_dot, t_dot):  # a forward_with_tangent-style callable
        return torch.func.jvp(orc.average_velocity, (z, r, t), (z_dot, r_dot, t_dot))

    v = orc.velocity(z, t)
    u, du = tangent_along_v_pair(pair, z, r, t, v)
    assert torch.allclose(differential_target(v, r, t, du), orc.average_velocity(z, r, t), atol=1e-12)


def test_jvp_keeps_u_differentiable_and_tangent_detached():
    orc, z, r, t = _setup()
    w = torch.tensor(1.3, dtype=D, requires_grad=True)
    u, du = tangent_along_v(lambda z, r, t: w * orc.average_velocity(z, r, t), z, r, t, orc.velocity(z, t))
    assert u.requires_grad and not du.requires_grad
    u.sum().backward()
    assert w.grad is not None


def test_flow_matching_target_detached():
    v = torch.ones(3, 2, requires_grad=True)
    out = flow_matching_target(v)
    assert not out.requires_grad and torch.equal(out, v.detach())


def _err(a, b):
    return (a - b).abs().max().item()


def _order(errs, factor=2.0):
    return [math.log(errs[i] / errs[i + 1]) / math.log(factor) for i in range(len(errs) - 1)]


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2)])
def test_teacher_solver_converges_with_order(solver, order):
    orc, z, r, t = _setup(equal_rows=False)
    exact = orc.average_velocity(z, r, t)
    errs = [_err(teacher_solver_target(orc.velocity, z, r, t, k, solver), exact) for k in (8, 16, 32, 64)]
    slopes = _order(errs)
    assert all(abs(s - order) < 0.15 for s in slopes), (errs, slopes)


def test_teacher_solver_equal_rows_fall_back_to_v():
    orc, z, r, t = _setup()
    r[:] = t
    out = teacher_solver_target(orc.velocity, z, r, t, 3, "heun")
    assert torch.isfinite(out).all()
    assert torch.allclose(out, orc.velocity(z, t), atol=1e-14)


def test_alphaflow_converges_to_differential_target():
    orc, z, r, t = _setup(equal_rows=False)
    v = orc.velocity(z, t)
    exact = orc.average_velocity(z, r, t)
    errs = [_err(alphaflow_target(orc, z, r, t, v, a), exact) for a in (0.2, 0.1, 0.05, 0.025)]
    slopes = _order(errs)
    assert all(abs(s - 2) < 0.2 for s in slopes), (errs, slopes)


def test_alphaflow_direction_converges_for_a_perturbed_student():
    # With the exact u every target is u, so the test above cannot tell the differential target
    # from any other consistent one. With a student wrong over long intervals (exact at r = t),
    # (target − u)/α → (differential target − u) with an O(α) error, as for split.
    orc, z, r, t = _setup(equal_rows=False)

    def student(z, r, t):
        return orc.average_velocity(z, r, t) + 0.3 * (t - r)[:, None, None] * z

    v = orc.velocity(z, t)
    u, du = tangent_along_v(student, z, r, t, v)
    direction = differential_target(v, r, t, du) - u
    alphas = (0.1, 0.05, 0.025, 0.0125)
    errs = [_err((alphaflow_target(student, z, r, t, v, a) - u) / a, direction) for a in alphas]
    slopes = _order(errs)
    assert all(abs(s - 1) < 0.2 for s in slopes), (errs, slopes)


def test_alphaflow_alpha_one_is_flow_matching_and_equal_rows_are_v():
    orc, z, r, t = _setup()
    v = orc.velocity(z, t)
    assert torch.allclose(alphaflow_target(orc, z, r, t, v, 1.0), v, atol=1e-13)
    out = alphaflow_target(orc, z, r, t, v, 0.3)
    assert torch.allclose(out[:2], v[:2], atol=0) and torch.isfinite(out).all()


@pytest.mark.parametrize("lam", [0.9, 0.5, 0.1, 1e-3])
def test_split_is_exact_for_the_exact_u(lam):
    orc, z, r, t = _setup()
    v = orc.velocity(z, t)
    out = split_target(orc, z, r, t, v, lam)
    assert torch.allclose(out, orc.average_velocity(z, r, t), atol=1e-12)
    assert torch.equal(out[:2], v[:2])


def test_split_direction_converges_as_s_tends_to_t_for_a_perturbed_student():
    # A student u + (t − r)·c·z: wrong over long intervals, exact at r = t (so its own velocity is
    # v). As λ → 0 the split target tends to the student's own u, and (target − u)/λ tends to
    # (differential target − u), with an O(λ) error: the regression points the same way.
    orc, z, r, t = _setup(equal_rows=False)
    c = 0.3

    def student(z, r, t):
        return orc.average_velocity(z, r, t) + c * (t - r)[:, None, None] * z

    v = orc.velocity(z, t)
    u, du = tangent_along_v(student, z, r, t, v)
    direction = differential_target(v, r, t, du) - u
    lams = (0.1, 0.05, 0.025, 0.0125)
    errs = [_err((split_target(student, z, r, t, v, lam) - u) / lam, direction) for lam in lams]
    slopes = _order(errs)
    assert all(abs(s - 1) < 0.2 for s in slopes), (errs, slopes)


def test_discrete_target_dispatch_and_errors():
    orc, z, r, t = _setup()
    v = orc.velocity(z, t)
    exact = orc.average_velocity(z, r, t)
    g = torch.Generator().manual_seed(0)
    for kind in ("teacher_solver", "alphaflow", "split"):
        cfg = DiscreteTargetConfig(kind=kind, solver_steps=64, alpha=0.01)
        out = discrete_target(cfg, z=z, r=r, t=t, v=v, velocity=orc.velocity, student=orc, generator=g)
        assert _err(out, exact) < 1e-3 and not out.requires_grad
    with pytest.raises(ValueError, match="velocity"):
        discrete_target(DiscreteTargetConfig(), z=z, r=r, t=t, v=v, student=orc)
    with pytest.raises(ValueError, match="student"):
        discrete_target(DiscreteTargetConfig(kind="split"), z=z, r=r, t=t, v=v, velocity=orc.velocity)


def test_teacher_solver_reads_the_teachers_velocity_not_the_mixed_one():
    """With ω/κ mixing the target velocity v is partly the student's; the teacher solver solves
    the teacher's ODE alone, on every step and on r = t rows (it read v for its first step)."""
    orc, z, r, t = _setup()
    v_teacher = orc.velocity(z, t)
    v_mixed = v_teacher + 0.5
    cfg = DiscreteTargetConfig(kind="teacher_solver", solver_steps=3, solver="heun")
    out = discrete_target(cfg, z=z, r=r, t=t, v=v_mixed, velocity=orc.velocity, teacher_v=v_teacher)
    torch.testing.assert_close(out, teacher_solver_target(orc.velocity, z, r, t, 3, "heun"), rtol=0, atol=0)
    alpha = DiscreteTargetConfig(kind="alphaflow", alpha=0.5)  # the mixed v is alphaflow's target velocity
    torch.testing.assert_close(discrete_target(alpha, z=z, r=r, t=t, v=v_mixed, student=orc, teacher_v=v_teacher),
                               alphaflow_target(orc, z, r, t, v_mixed, 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,name", [
    ({"kind": "euler"}, "kind"), ({"solver_steps": 0}, "solver_steps"), ({"solver": "rk4"}, "solver"),
    ({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"split_lambda": 1.0}, "split_lambda"),
])
def test_discrete_config_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DiscreteTargetConfig(**kwargs)


def test_r_greater_than_t_rejected():
    orc, z, r, t = _setup()
    with pytest.raises(ValueError, match="r"):
        differential_target(orc.velocity(z, t), t, r, torch.zeros_like(z))


@pytest.mark.parametrize("dtype,h,tol", [(torch.float32, 2.0 ** -16, 1e-5), (torch.bfloat16, 2.0 ** -7, 0.05)])
def test_teacher_solver_short_interval_in_low_precision(dtype, h, tol):
    # (z − Φ)/(t − r) loses every digit of z that the short step does not move: the target must be
    # as accurate as the velocities it averages (times are dyadic, so exact in float32).
    orc, z, _, _ = _setup(equal_rows=False)
    t = torch.full((z.shape[0],), 0.75, dtype=D)
    r = t - h
    exact = orc.average_velocity(z, r, t)
    out = teacher_solver_target(lambda z_, t_: orc.velocity(z_.double(), t_.double()).to(dtype), z.to(dtype),
                                r.float(), t.float(), 4, "heun")
    assert out.dtype == dtype
    assert _err(out.double(), exact) < tol * exact.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_draws_lambda_for_low_precision_times(dtype):
    # λ drawn just below 1 used to round to 1.0 in the times' dtype and fail split_target's check.
    orc = GaussianOracle(0.5, 0.7)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4096, 2, generator=g).to(dtype)
    t = torch.full((4096,), 0.75, dtype=dtype)
    r = torch.full((4096,), 0.25, dtype=dtype)
    out = discrete_target(DiscreteTargetConfig(kind="split"), z=z, r=r, t=t, v=orc.velocity(z, t),
                          student=orc, generator=g)
    assert out.shape == z.shape and torch.isfinite(out).all()
