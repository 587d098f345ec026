"""The training step's pieces on the tiny preset (one Distiller, one or two steps): what the
guided target velocity is made of, and the guidance checks made before anything is written."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from meanflow.method import guidance as guidance_module  # noqa: E402
from meanflow.train.config import ConfigError, load_config  # noqa: E402
from meanflow.train.loop import Distiller  # noqa: E402
from meanflow.train.world import DigitsWorld  # noqa: E402

pytestmark = pytest.mark.usefixtures("reference_one_thread")


@pytest.fixture(scope="module")
def world():
    return DigitsWorld()


def _distiller(world, tmp_path, *overrides):
    return Distiller(load_config("tiny", None, [f"run.out_dir={tmp_path / 'run'}", *overrides]), world=world)


@pytest.mark.parametrize("mode", ["cfg", "none"])
def test_omega_kappa_mixing_uses_the_unconditional_student(world, tmp_path, monkeypatch, mode):
    """ṽ = ω·v + κ·u_θ(z, t, t | c) + (1 − ω − κ)·u_θ(z, t, t | ∅): the last term must see the
    empty prompt (it saw the prompt itself, making ṽ = ω·v + (1 − ω)·u_c), in every mode."""
    d = _distiller(world, tmp_path, f"method.guidance.mode={mode}", "method.guidance.omega=0.5",
                   "method.guidance.kappa=0.2")
    seen = {}
    real = guidance_module.mix_with_student

    def spy(v, u_cond, u_uncond, t, config):
        seen.update(v=v, u_cond=u_cond, u_uncond=u_uncond, t=t)
        return real(v, u_cond, u_uncond, t, config)

    monkeypatch.setattr(guidance_module, "mix_with_student", spy)
    state = {k: p.detach().clone() for k, p in d.student.state_dict().items()}
    captured = {}
    real_forward = type(d.student).forward_with_tangent

    def capture(self, z, r, t, cond, z_dot, *args, **kwargs):
        captured.update(z=z, cond=cond, z_dot=z_dot)
        return real_forward(self, z, r, t, cond, z_dot, *args, **kwargs)

    monkeypatch.setattr(type(d.student), "forward_with_tangent", capture)
    d.schedule.config.phase_a_steps = d.schedule._b_start = 0  # a differential step at once
    d.schedule.config.phase_b_steps = 0
    assert not d.step().skipped
    # Recompute both student terms by hand, with the weights the step saw.
    d.student.load_state_dict(state)
    z, t, batch = captured["z"], seen["t"], seen["t"].shape[0]
    uncond = world.condition([""] * batch)
    with torch.no_grad():
        u_c = d.student(z, t, t, captured["cond"])
        u_u = d.student(z, t, t, uncond)
    assert not torch.allclose(u_c, u_u)  # the prompt matters, so the test can tell them apart
    torch.testing.assert_close(seen["u_uncond"], u_u)
    torch.testing.assert_close(seen["u_cond"], u_c)
    expected = 0.5 * seen["v"] + 0.2 * u_c + 0.3 * u_u
    torch.testing.assert_close(captured["z_dot"], expected)  # ṽ is the JVP tangent (and the target's v)


def test_embedded_guidance_needs_a_guidance_embedded_teacher(world, tmp_path):
    with pytest.raises(ConfigError, match="method.guidance.mode"):
        _distiller(world, tmp_path, "method.guidance.mode=embedded")
    assert not (tmp_path / "run").exists()


def test_fake_lora_trains_the_adapters_alone(world, tmp_path):
    """model.fake_lora_rank: the fake network is the teacher's copy, frozen, plus adapters; its
    optimizer holds the factors alone, and phase C's updates move them and nothing else."""
    from meanflow.models.lora import lora_parameters

    d = _distiller(world, tmp_path, "model.fake_lora_rank=2", "model.fake_lora_alpha=4")
    factors = lora_parameters(d.fake)
    assert factors and [p for group in d.fake_optimizer.param_groups for p in group["params"]] == factors
    assert {n for n, p in d.fake.named_parameters() if p.requires_grad} == {
        n for n, p in d.fake.named_parameters() if "lora_" in n}
    before = {n: p.detach().clone() for n, p in d.fake.named_parameters()}
    while d.step().phase != "C":
        pass
    moved = {n for n, p in d.fake.named_parameters() if not torch.equal(before[n], p)}
    assert moved and all("lora_" in n for n in moved)
    teacher = dict(world.teacher.transformer.named_parameters())
    frozen = {n.replace(".base.", "."): p for n, p in d.fake.transformer.named_parameters()
              if "lora_" not in n}
    assert frozen.keys() == teacher.keys() and all(torch.equal(frozen[n], teacher[n]) for n in teacher)


def test_fake_lora_rank_the_layers_cannot_take_is_refused_by_key(world, tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.fake_lora_rank: .*exceeds"):
        _distiller(world, tmp_path, "model.fake_lora_rank=100000")
    with pytest.raises(ConfigError, match=r"model\.fake_lora_rank"):
        _distiller(world, tmp_path, "model.fake_lora_rank=-1")


def test_discrete_step_hands_the_teacher_solver_the_unmixed_teacher_velocity(world, tmp_path, monkeypatch):
    """With ω/κ mixing, the discrete target gets ṽ as its target velocity and the teacher's own
    velocity for the teacher solver (which used to start from ṽ, a student term)."""
    from meanflow.train import loop as loop_module

    d = _distiller(world, tmp_path, "method.guidance.omega=0.5", "method.guidance.kappa=0.2")
    seen, captured = {}, {}
    real_mix, real_target = guidance_module.mix_with_student, loop_module.discrete_target

    def spy_mix(v, u_cond, u_uncond, t, config):
        seen["v"] = v
        return real_mix(v, u_cond, u_uncond, t, config)

    def spy_target(config, **kwargs):
        captured.update(kwargs)
        return real_target(config, **kwargs)

    monkeypatch.setattr(guidance_module, "mix_with_student", spy_mix)
    monkeypatch.setattr(loop_module, "discrete_target", spy_target)
    assert d.step().phase == "A" and d.schedule.config.discrete_kind == "teacher_solver"
    assert captured["teacher_v"] is seen["v"]
    assert not torch.allclose(captured["v"], captured["teacher_v"])  # ṽ is mixed


def test_the_loss_switch_observes_the_plain_error(world, tmp_path, monkeypatch):
    """schedule.switch=loss watches the unweighted mean squared error (the adaptive-weighted
    loss stays near 1 whatever the error, so its drop says nothing)."""
    d = _distiller(world, tmp_path, "method.schedule.switch=loss", "method.schedule.phase_a_steps=10")
    observed = []
    monkeypatch.setattr(d.schedule, "observe", lambda step, loss: observed.append((step, loss)))
    result = d.step()
    assert observed == [(0, result.mse)] and result.mse != result.meanflow


def test_alignment_rolls_out_on_the_runs_sampling_grid(world, tmp_path, monkeypatch):
    """Alignment shapes the trajectory the student is sampled on: with sample.shift=flux, the
    shifted grid (it always used the uniform one)."""
    from meanflow.method.sampler import SamplerConfig, time_grid
    from meanflow.train import loop as loop_module

    d = _distiller(world, tmp_path, "method.alignment.steps=2")
    d.config.sample.shift = "flux"  # (the config allows it for flux models only; the grid is the same code)
    grids = []
    real = loop_module.trajectory_alignment

    def spy(*args, grid=None, **kwargs):
        grids.append(grid)
        return real(*args, grid=grid, **kwargs)

    monkeypatch.setattr(loop_module, "trajectory_alignment", spy)
    while d.step().phase != "C":
        pass
    expected = time_grid(SamplerConfig(steps=2, shift="flux"), image_seq_len=world.latent_shape[0])
    assert len(grids) == 1 and torch.equal(grids[0], expected)
    assert not torch.equal(expected, time_grid(SamplerConfig(steps=2)))  # the shift moves the midpoint


def test_student_lora_trains_the_adapters_and_the_delta_embedder(world, tmp_path):
    from meanflow.models.lora import lora_parameters

    d = _distiller(world, tmp_path, "model.student_lora_rank=2")
    trained = {n for n, p in d.student.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in d.student.named_parameters() if "lora_" in n or n.startswith("delta_embedder.")}
    assert len([p for g in d.optimizer.param_groups for p in g["params"]]) == len(trained)
    assert set(d.ema.params) == trained and lora_parameters(d.student)
    before = {n: p.detach().clone() for n, p in d.student.named_parameters()}
    d.step()
    d.step()  # (A's first gradient is zero while B is)
    moved = {n for n, p in d.student.named_parameters() if not torch.equal(before[n], p)}
    assert moved and moved <= trained and any("lora_down" in n for n in moved)
    with pytest.raises(ConfigError, match=r"^model\.student_lora_rank: .*exceeds"):
        _distiller(world, tmp_path, "model.student_lora_rank=100000")


def test_compiled_steps_match_eager_ones(world, tmp_path):
    """model.compile: the step's forwards through torch.compile (phases A, B and C: the discrete,
    differential and alignment paths) give eager's losses and weights; the student module itself
    is not replaced (EMA, sampling and checkpoints use it)."""
    eager = _distiller(world, tmp_path / "eager")
    compiled = _distiller(world, tmp_path / "compiled", "model.compile=aot_eager")
    assert compiled.student_forward is not compiled.student
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for _ in range(4):
        want, got = eager.step(), compiled.step()
        assert got.phase == want.phase
        for field in ("loss", "meanflow", "align", "fake", "grad_norm"):
            assert got.__dict__[field] == pytest.approx(want.__dict__[field], rel=1e-5, nan_ok=True), field
    # The student's two forwards, the teacher's velocity and the fake network, each one graph.
    assert counters["stats"]["unique_graphs"] >= 4 and not counters["graph_break"]
    for (name, a), b in zip(eager.student.state_dict().items(), compiled.student.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_compile_backend_is_checked(world, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.compile"):
        _distiller(world, tmp_path, "model.compile=no_such_backend")


def test_grad_clip_zero_trains_unclipped(world, tmp_path):
    """optim.grad_clip=0 means no clipping: the step moves the parameters (clip_grad_norm_ with
    max_norm 0 would scale every gradient to 0), and the same step with a huge bound matches it."""
    steps = {}
    for clip in ("0", "1e30"):
        d = _distiller(world, tmp_path / clip, f"optim.grad_clip={clip}")
        before = {n: p.detach().clone() for n, p in d.student.named_parameters()}
        result = d.step()
        steps[clip] = {n: p.detach().clone() for n, p in d.student.named_parameters()}
        assert not result.skipped
        assert sum(not torch.equal(before[n], p) for n, p in steps[clip].items()) > len(before) // 2
    for name, p in steps["0"].items():
        torch.testing.assert_close(p, steps["1e30"][name], rtol=0, atol=0)


def test_the_fake_optimizer_takes_the_configured_weight_decay(world, tmp_path):
    for decay in (0.0, 0.05):
        d = _distiller(world, tmp_path / str(decay), f"optim.weight_decay={decay}")
        assert d.fake_optimizer is not None
        groups = (*d.optimizer.param_groups, *d.fake_optimizer.param_groups)
        assert {g["weight_decay"] for g in groups} == {decay}


# Phase C (alignment, the fake network's updates) from step 0.
PHASE_C = ("method.schedule.phase_a_steps=0", "method.schedule.phase_b_steps=0")


def _poison_fake_loss(monkeypatch, calls: int):
    """The first ``calls`` fake flow-matching losses of the run, times NaN (their graph kept, so
    a backward would run)."""
    from meanflow.train import loop as loop_module

    real, seen = loop_module.fake_flow_matching_loss, []

    def poisoned(*args, **kwargs):
        seen.append(None)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(seen) <= calls else loss

    monkeypatch.setattr(loop_module, "fake_flow_matching_loss", poisoned)


def test_a_nonfinite_fake_loss_skips_that_fake_update(world, tmp_path, monkeypatch):
    """A NaN fake loss no longer reaches the fake network's weights: that update is skipped and
    counted, the next one steps, and the student's step is not blamed."""
    _poison_fake_loss(monkeypatch, 1)
    d = _distiller(world, tmp_path, *PHASE_C, "method.alignment.fake_updates_per_student_step=2")
    before = {n: p.detach().clone() for n, p in d.fake.named_parameters()}
    result = d.step()
    assert all(torch.isfinite(p).all() for p in d.fake.parameters())
    assert any(not torch.equal(before[n], p) for n, p in d.fake.named_parameters())
    assert result.phase == "C" and not result.skipped and result.fake_skipped == 1
    assert (d.fake_nonfinite_total, d.fake_nonfinite_in_a_row) == (1, 0)  # the second update stepped
    assert d.state()["fake_nonfinite_total"] == 1


def test_a_nonfinite_fake_gradient_norm_skips_the_fake_step(world, tmp_path, monkeypatch):
    """A finite fake loss with a non-finite gradient norm: no optimizer step, no gradient kept
    (the norm used to be discarded and the step taken)."""
    from meanflow.train import loop as loop_module

    d = _distiller(world, tmp_path, *PHASE_C)
    real = loop_module._clip_grad_norm
    monkeypatch.setattr(loop_module, "_clip_grad_norm",
                        lambda model, clip: float("inf") if model is d.fake else real(model, clip))
    before = {n: p.detach().clone() for n, p in d.fake.named_parameters()}
    result = d.step()
    assert all(torch.equal(before[n], p) for n, p in d.fake.named_parameters())
    assert all(p.grad is None for p in d.fake.parameters())
    assert not result.skipped and result.fake_skipped == 1 and d.fake_nonfinite_in_a_row == 1


def test_persistent_nonfinite_fake_updates_stop_the_run_naming_the_fake_network(world, tmp_path, monkeypatch):
    from meanflow.train.loop import NonFiniteLossError

    _poison_fake_loss(monkeypatch, 2)
    d = _distiller(world, tmp_path, *PHASE_C, "method.alignment.fake_updates_per_student_step=2")
    assert not d.step().skipped  # the student's step is fine; its 2 fake updates were not
    with pytest.raises(NonFiniteLossError, match=r"2 updates in a row of the fake network .*optim\.fake_lr"):
        d.check_finite()


@pytest.mark.parametrize("broken", ["fake", "teacher"])
def test_a_student_step_broken_by_the_fake_velocity_names_the_fake_network(world, tmp_path, monkeypatch,
                                                                          broken):
    """Fake weights already non-finite make the alignment term (so the student's loss) NaN: the
    stop message says optim.fake_lr, not optim.lr (it sent users to the student's rate). A NaN
    teacher velocity (NaN in both clean estimates) still names optim.lr."""
    from meanflow.train.loop import NonFiniteLossError

    d = _distiller(world, tmp_path, *PHASE_C)
    if broken == "fake":
        with torch.no_grad():
            next(p for p in d.fake.parameters() if p.requires_grad).fill_(float("nan"))
    else:
        real = type(d.guided).__call__
        monkeypatch.setattr(type(d.guided), "__call__", lambda *a, **kw: real(*a, **kw) * float("nan"))
    assert d.step().skipped and d.step().skipped
    with pytest.raises(NonFiniteLossError, match="2 steps in a row") as info:
        d.check_finite()
    assert ("optim.fake_lr" in str(info.value)) == (broken == "fake")
    assert ("Lower optim.lr," in str(info.value)) == (broken == "teacher")
