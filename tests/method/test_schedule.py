"""The warm-up schedule: phases, mixing, the loss criterion, resume."""
import pickle

import pytest
import torch

from meanflow.method import ScheduleConfig, WarmupSchedule


def test_phases_by_steps_per_step_mixing():
    s = WarmupSchedule(ScheduleConfig(phase_a_steps=10, phase_b_steps=20))
    objs = [s.objective(n) for n in range(40)]
    assert [o.phase for o in objs] == ["A"] * 10 + ["B"] * 20 + ["C"] * 10
    assert all(o.differential_fraction == 0.0 and not o.alignment for o in objs[:10])
    assert all(o.differential_fraction == 1.0 and o.alignment for o in objs[30:])
    b = [o.differential_fraction for o in objs[10:30]]
    assert set(b) <= {0.0, 1.0}
    # The differential share rises: the count so far follows Σ share = j(j − 1)/(2L).
    for j in range(21):
        assert sum(b[:j]) == (j * (j - 1)) // 40
    assert sum(b[:10]) < sum(b[10:])
    assert objs[0].discrete_kind == "teacher_solver"
    assert objs[0].needs_discrete and not objs[0].needs_differential


def test_per_sample_mixing_and_mask():
    s = WarmupSchedule(ScheduleConfig(phase_a_steps=0, phase_b_steps=4, mixing="per_sample", alignment=False))
    fracs = [s.objective(n).differential_fraction for n in range(6)]
    assert fracs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert not s.objective(5).alignment
    mask = s.objective(2).mask(10, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (10,) and int(mask.sum()) == 5


def test_loss_criterion_and_resume():
    """Phase A ends once the running mean (window 4) stayed below half the first window's mean
    for 3 observations in a row: a relative drop, whatever the loss's scale."""
    cfg = ScheduleConfig(phase_a_steps=1000, phase_b_steps=10, switch="loss", loss_threshold=0.5,
                         loss_window=4, loss_patience=3)
    for scale in (1.0, 1e-3):  # the same switch at any scale of the loss
        s = WarmupSchedule(cfg)
        losses = [scale * x for x in (2.0, 1.0, 0.9, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1)]
        for n, loss in enumerate(losses[:5]):
            assert s.objective(n).phase == "A"
            s.observe(n, torch.tensor(loss))
        saved = pickle.loads(pickle.dumps(s.state_dict()))
        resumed = WarmupSchedule(cfg)
        resumed.load_state_dict(saved)
        for sched in (s, resumed):
            for n, loss in enumerate(losses[5:], start=5):
                sched.observe(n, loss)
        # Reference (n = 3): 1.025. Running means: n=4 0.55 (not < 0.5125), n=5 0.325, n=6 0.125,
        # n=7 0.1: the third in a row below is n = 7, so B starts at 8.
        assert s.b_start == resumed.b_start == 8
        assert s.objective(7).phase == "A" and s.objective(8).phase == "B"
        assert s.objective(18).phase == "C"
        s.observe(100, 50.0)  # no effect once switched
        assert s.b_start == 8


def test_loss_criterion_needs_a_drop_not_a_small_loss():
    """A loss that is small from the start but does not fall never ends phase A early (the
    absolute criterion ended it after loss_patience steps for the adaptive-weighted loss < 1)."""
    s = WarmupSchedule(ScheduleConfig(phase_a_steps=50, phase_b_steps=2, switch="loss", loss_window=3,
                                      loss_patience=2))
    for n in range(50):
        s.observe(n, 0.01)
    assert s.b_start == 50


def test_loss_switch_caps_at_phase_a_steps():
    s = WarmupSchedule(ScheduleConfig(phase_a_steps=5, phase_b_steps=2, switch="loss"))
    for n in range(5):
        s.observe(n, 10.0)
    assert s.objective(4).phase == "A" and s.objective(5).phase == "B" and s.objective(7).phase == "C"


def test_steps_resume_is_stateless():
    cfg = ScheduleConfig(phase_a_steps=3, phase_b_steps=5)
    a, b = WarmupSchedule(cfg), WarmupSchedule(cfg)
    b.load_state_dict(a.state_dict())
    assert [a.objective(n) for n in range(12)] == [b.objective(n) for n in range(12)]


@pytest.mark.parametrize("kwargs,name", [
    ({"phase_a_steps": -1}, "phase_a_steps"), ({"phase_b_steps": 1.5}, "phase_b_steps"),
    ({"mixing": "random"}, "mixing"), ({"switch": "plateau"}, "switch"), ({"loss_window": 0}, "loss_window"),
    ({"loss_patience": 0}, "loss_patience"), ({"discrete_kind": "euler"}, "discrete_kind"),
    ({"loss_threshold": 0.0}, "loss_threshold"), ({"loss_threshold": float("nan")}, "loss_threshold"),
])
def test_config_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ScheduleConfig(**kwargs)


def test_argument_errors():
    s = WarmupSchedule()
    with pytest.raises(ValueError, match="step"):
        s.objective(-1)
    with pytest.raises(ValueError, match="state"):
        s.load_state_dict({})
