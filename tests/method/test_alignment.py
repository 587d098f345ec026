"""Trajectory distribution alignment (DESIGN §2 TDA): the rollout's gradient placement, the
re-noising windows, the exact gradient g, the fake network's flow-matching loss."""
from __future__ import annotations

import pytest
import torch

from meanflow.method import GaussianOracle
from meanflow.method.alignment import (AlignmentConfig, choose_stage, default_grid, fake_flow_matching_loss,
                                       make_fake_velocity, renoise, renoise_times, rollout,
                                       trajectory_alignment)
from meanflow.method.sampler import SamplerConfig, time_grid
from meanflow.ops import alignment_direction

D = torch.float64


class RecordingStudent(torch.nn.Module):
    """u(z, r, t) = a·z + b·(t − r) + c·t with parameters a, b, c; records every call."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3, dtype=D))
        self.b = torch.nn.Parameter(torch.tensor(-0.7, dtype=D))
        self.c = torch.nn.Parameter(torch.tensor(0.2, dtype=D))
        self.calls = []

    def forward(self, z, r, t):
        self.calls.append((torch.is_grad_enabled(), float(r[0]), float(t[0]), z.requires_grad))
        return self.a * z + _bcast(self.b * (t - r) + self.c * t, z)


def _bcast(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def _linear_velocity(scale, shift):
    return lambda x, t: scale * x + shift * _bcast(t, x)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_rollout_keeps_gradient_only_at_the_chosen_stage(steps):
    grid = time_grid(SamplerConfig(steps=steps))
    noise = torch.randn(3, 5, dtype=D)
    for stage in range(steps):
        student = RecordingStudent()
        z_k, x_hat = rollout(student, noise, grid, stage)
        calls = student.calls
        assert len(calls) == stage + 1  # nothing after the chosen stage runs
        for j, (grad_on, r, t, z_grad) in enumerate(calls[:-1]):
            assert not grad_on and not z_grad
            assert (r, t) == (float(grid[j + 1]), float(grid[j]))
        grad_on, r, t, z_grad = calls[-1]
        assert grad_on and not z_grad and (r, t) == (0.0, float(grid[stage]))
        assert not z_k.requires_grad and x_hat.requires_grad
        # The gradient is that of the last call alone, with z_k a constant.
        x_hat.sum().backward()
        tau = float(grid[stage])
        torch.testing.assert_close(student.a.grad, -tau * z_k.sum(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(student.b.grad, torch.tensor(-tau * tau * 15, dtype=D),
                                   rtol=1e-12, atol=1e-12)
        # The values are the sampler's.
        z = noise
        for j in range(stage):
            hi, lo = float(grid[j]), float(grid[j + 1])
            z = z - (hi - lo) * (0.3 * z + (-0.7 * (hi - lo) + 0.2 * hi))
        torch.testing.assert_close(z_k, z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_renoise_times_fall_in_the_stage_window(steps):
    config = AlignmentConfig(steps=steps)
    gen = torch.Generator().manual_seed(3)
    grid = time_grid(SamplerConfig(steps=steps, shift="fixed", mu=1.15))  # non-uniform windows
    for stage in range(steps):
        t = renoise_times(4096, config, grid, stage, generator=gen, dtype=D)
        lo, hi = float(grid[stage + 1]), float(grid[stage])
        assert bool((t > lo).all()) and bool((t <= hi).all())
        assert t.min() < lo + 0.01 * (hi - lo) and t.max() > hi - 0.01 * (hi - lo)  # covers the window


def test_renoise_times_global_window():
    config = AlignmentConfig(window="global", t_min=0.1, t_max=0.6)
    t = renoise_times(4096, config, generator=torch.Generator().manual_seed(0), dtype=D)
    assert bool((t > 0.1).all()) and bool((t <= 0.6).all())


def test_alignment_uses_the_stage_window_end_to_end():
    gen = torch.Generator().manual_seed(5)
    config = AlignmentConfig(steps=4)
    grid = default_grid(config)
    student = RecordingStudent()
    for _ in range(12):
        out = trajectory_alignment(student, _linear_velocity(0.5, 0.1), _linear_velocity(0.4, 0.3),
                                   torch.randn(6, 3, dtype=D), config, generator=gen)
        lo, hi = float(grid[out.stage + 1]), float(grid[out.stage])
        assert bool((out.t > lo).all()) and bool((out.t <= hi).all())
        torch.testing.assert_close(out.x_t, renoise(out.x_hat.detach(), out.t, out.noise), rtol=0, atol=0)


def test_alignment_gradient_is_exactly_g(monkeypatch):
    """DESIGN §2 step 5, in float64: the gradient of B·L_align with respect to x̂ is g."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    teacher, fake = _linear_velocity(0.5, 0.1), _linear_velocity(0.4, 0.3)
    out = trajectory_alignment(RecordingStudent(), teacher, fake, torch.randn(5, 2, 3, dtype=D),
                               AlignmentConfig(steps=2), stage=1, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(out.loss, out.x_hat)
    tb = out.t[:, None, None]
    x0_fake = out.x_t - tb * fake(out.x_t, out.t)
    x0_teacher = out.x_t - tb * teacher(out.x_t, out.t)
    torch.testing.assert_close(out.x0_fake, x0_fake, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(out.x0_teacher, x0_teacher, rtol=1e-15, atol=1e-15)
    denom = (out.x_hat.detach() - x0_teacher).abs().mean((1, 2), keepdim=True)
    g = (x0_fake - x0_teacher) / denom
    torch.testing.assert_close(grad * 5, g, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(g, alignment_direction(out.x_hat, x0_fake, x0_teacher), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(out.loss, 0.5 * g.square().sum() / 5, rtol=1e-14, atol=0)


def test_alignment_gradient_reaches_the_student_only():
    student = RecordingStudent()
    fake_net = torch.nn.Linear(3, 3).double()
    out = trajectory_alignment(student, _linear_velocity(0.5, 0.1), lambda x, t: fake_net(x),
                               torch.randn(4, 3, dtype=D), AlignmentConfig(steps=2), stage=0)
    out.loss.backward()
    assert student.a.grad is not None and student.a.grad != 0
    assert all(p.grad is None for p in fake_net.parameters())


def test_fake_equal_to_teacher_gives_zero_loss():
    """With the exact average velocity of Gaussian data and v_φ = v_T, g vanishes."""
    oracle = GaussianOracle(mean=torch.tensor([0.7, -1.2, 0.0]), std=torch.tensor([0.3, 1.5, 0.5]))
    out = trajectory_alignment(lambda z, r, t: oracle.average_velocity(z, r, t), oracle.velocity,
                               oracle.velocity, torch.randn(8, 3, dtype=D), AlignmentConfig(steps=2), stage=1)
    assert out.loss.item() == 0.0 and bool((out.per_sample == 0).all())


def test_conditioning_is_passed_through():
    seen = []

    def student(z, r, t, cond):
        seen.append(("student", cond))
        return z

    def velocity(name):
        def v(x, t, cond):
            seen.append((name, cond))
            return x
        return v

    trajectory_alignment(student, velocity("teacher"), velocity("fake"), torch.randn(2, 3), stage=1, cond="c")
    assert {name for name, _ in seen} == {"student", "teacher", "fake"} and all(c == "c" for _, c in seen)


def test_fake_flow_matching_loss():
    fake_net = torch.nn.Linear(3, 3).double()
    samples = torch.randn(4, 3, dtype=D, requires_grad=True)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0], dtype=D)
    noise = torch.randn(4, 3, dtype=D)
    loss = fake_flow_matching_loss(lambda x, tt: fake_net(x), samples, t=t, noise=noise)
    x_t = (1 - t[:, None]) * samples.detach() + t[:, None] * noise
    expected = (fake_net(x_t) - (noise - samples.detach())).square().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    loss.backward()
    assert samples.grad is None and fake_net.weight.grad is not None
    # Default times lie in (t_min, t_max].
    times = []
    fake_flow_matching_loss(lambda x, tt: times.append(tt) or x, samples,
                            AlignmentConfig(t_min=0.2, t_max=0.3), generator=torch.Generator().manual_seed(0))
    assert bool((times[0] > 0.2).all()) and bool((times[0] <= 0.3).all())


def test_make_fake_velocity_copies_the_teacher():
    teacher = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.SiLU(), torch.nn.Linear(4, 3)).eval()
    teacher.requires_grad_(False)
    fake = make_fake_velocity(teacher)
    x = torch.randn(2, 3)
    torch.testing.assert_close(fake(x), teacher(x), rtol=0, atol=0)
    assert fake.training and not teacher.training
    assert all(p.requires_grad for p in fake.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        next(fake.parameters()).add_(1.0)
    assert not torch.equal(fake(x), teacher(x))  # independent storage


def test_choose_stage_is_uniform():
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([choose_stage(4, gen) for _ in range(4000)]), minlength=4)
    assert counts.numel() == 4 and bool((counts > 900).all())


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="steps"):
        AlignmentConfig(steps=0)
    with pytest.raises(ValueError, match="window"):
        AlignmentConfig(window="local")
    with pytest.raises(ValueError, match="t_min, t_max"):
        AlignmentConfig(t_min=0.5, t_max=0.5)
    with pytest.raises(ValueError, match="weight"):
        AlignmentConfig(weight=-1.0)
    with pytest.raises(ValueError, match="fake_updates_per_student_step"):
        AlignmentConfig(fake_updates_per_student_step=0)
    with pytest.raises(ValueError, match="eps"):
        AlignmentConfig(eps=0.0)
    with pytest.raises(ValueError, match="stage"):
        rollout(RecordingStudent(), torch.randn(2, 3, dtype=D), time_grid(SamplerConfig(steps=2)), 2)
    with pytest.raises(ValueError, match="grid"):
        rollout(RecordingStudent(), torch.randn(2, 3, dtype=D), torch.tensor([0.0, 1.0]), 0)
    with pytest.raises(ValueError, match="stage"):
        renoise_times(3, AlignmentConfig())
    with pytest.raises(ValueError, match="teacher"):
        make_fake_velocity(lambda x, t: x)
    with pytest.raises(ValueError, match="t: expected"):
        fake_flow_matching_loss(lambda x, t: x, torch.randn(2, 3), t=torch.rand(3))


def test_triton_backend_matches_reference(monkeypatch, poison_empty):
    """The whole alignment step through the Triton kernel (the interpreter on CPU), float32."""
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("MEANFLOW_BACKEND", backend)
        student = RecordingStudent().float()
        out = trajectory_alignment(student, _linear_velocity(0.5, 0.1), _linear_velocity(0.4, 0.3),
                                   torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2)),
                                   AlignmentConfig(steps=2), generator=torch.Generator().manual_seed(4))
        out.loss.backward()
        results[backend] = (out.loss.detach(), out.per_sample, student.a.grad, student.b.grad)
    for ref, tri in zip(results["reference"], results["triton"]):
        torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [-1, 2])
def test_renoise_times_rejects_a_stage_outside_the_grid(stage):
    # -1 used to index from the end (a reversed window: t′ in [0, 1)), 2 an IndexError.
    with pytest.raises(ValueError, match="stage"):
        renoise_times(4, AlignmentConfig(steps=2), time_grid(SamplerConfig(steps=2)), stage)
