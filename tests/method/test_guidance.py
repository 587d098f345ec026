"""Guided teacher velocity: embedded guidance, true CFG, MeanFlow ω/κ mixing."""
from dataclasses import dataclass

import pytest
import torch

from meanflow.method import GuidanceConfig, GuidedTeacher, cfg_combine, mix_with_student, sample_scales


@dataclass
class Cond:
    text: float
    guidance: torch.Tensor | None = None


def teacher(z, t, cond):
    g = cond.guidance if cond.guidance is not None else torch.zeros(z.shape[0])
    return cond.text * z + (g * t)[:, None]


def test_embedded_guidance_reaches_teacher():
    gt = GuidedTeacher(teacher, GuidanceConfig(mode="embedded", scales=(2.0, 3.0)))
    z, t = torch.ones(64, 3), torch.full((64,), 0.5)
    cond, g = gt.prepare(Cond(1.0), 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cond.guidance, g) and g.dtype == torch.float32 and g.shape == (64,)
    assert set(g.tolist()) == {2.0, 3.0}
    assert torch.allclose(gt(z, t, cond), z + 0.5 * g[:, None])


def test_true_cfg():
    gt = GuidedTeacher(teacher, GuidanceConfig(mode="cfg", scales=(4.0,)))
    z, t = torch.randn(5, 3), torch.rand(5)
    cond, w = gt.prepare(Cond(2.0), 5)
    assert cond.guidance is None and torch.equal(w, torch.full((5,), 4.0))
    v = gt(z, t, cond, uncond=Cond(0.5), scale=w)
    assert torch.allclose(v, 0.5 * z + 4.0 * (2.0 * z - 0.5 * z))
    with pytest.raises(ValueError, match="uncond"):
        gt(z, t, cond, scale=w)
    with pytest.raises(ValueError, match="scale"):
        gt(z, t, cond, uncond=Cond(0.5))
    assert torch.allclose(cfg_combine(torch.ones(2, 2), torch.zeros(2, 2), torch.tensor([1.0, 3.0])),
                          torch.tensor([[1.0, 1.0], [3.0, 3.0]]))


def test_none_mode_and_no_mixing_passthrough():
    gt = GuidedTeacher(teacher, GuidanceConfig(mode="none"))
    z, t = torch.randn(3, 2), torch.rand(3)
    cond, g = gt.prepare(Cond(1.5), 3)
    assert g is None
    v = gt(z, t, cond)
    assert torch.allclose(v, 1.5 * z)
    assert torch.equal(gt.mixed(v, None, z, t, cond, None), v)


def test_omega_kappa_mixing():
    cfg = GuidanceConfig(mode="none", omega=0.2, kappa=0.5, t_min=0.0, t_max=0.75)
    calls = []

    def student(z, r, t, cond):
        calls.append(cond)
        assert torch.equal(r, t)  # the student's own r = t prediction
        return torch.full_like(z, 10.0 if cond == "c" else -1.0)

    z, t = torch.zeros(4, 2), torch.tensor([0.1, 0.5, 0.75, 0.9])
    v = torch.ones(4, 2)
    out = GuidedTeacher(teacher, cfg).mixed(v, student, z, t, "c", "u")
    expected = 0.2 * 1 + 0.5 * 10 + (1 - 0.2 - 0.5) * -1
    assert torch.allclose(out[:3], torch.full((3, 2), expected)) and torch.equal(out[3], v[3])
    assert sorted(calls) == ["c", "u"] and not out.requires_grad
    assert torch.allclose(mix_with_student(v, v, v, t, cfg), v)  # the weights sum to 1


def test_scales_and_errors():
    s = sample_scales(1000, GuidanceConfig(scales=(4.0, 4.5, 5.0)), torch.Generator().manual_seed(0))
    counts = torch.stack([(s == x).sum() for x in (4.0, 4.5, 5.0)])
    assert int(counts.sum()) == 1000 and bool((counts > 280).all())
    with pytest.raises(ValueError, match="mode"):
        GuidanceConfig(mode="flux")
    with pytest.raises(ValueError, match="scales"):
        GuidanceConfig(scales=())
    for bad in (4.0, "4.0", ("a",)):  # a bare number used to be a TypeError
        with pytest.raises(ValueError, match="scales"):
            GuidanceConfig(scales=bad)
    with pytest.raises(ValueError, match="t_min"):
        GuidanceConfig(t_min=0.8, t_max=0.2)
    # True CFG's w never reaches the student: several would make it regress onto a mixture.
    with pytest.raises(ValueError, match="scales: the cfg mode takes one guidance scale w"):
        GuidanceConfig(mode="cfg")
    assert GuidanceConfig(mode="cfg", scales=(2.0, 2.0)).scales == (2.0, 2.0)
    with pytest.raises(ValueError, match="cond"):
        GuidedTeacher(teacher).prepare({"guidance": None}, 2)
    with pytest.raises(ValueError, match="uncond"):
        GuidedTeacher(teacher, GuidanceConfig(kappa=0.5)).mixed(torch.ones(1, 1), None, torch.ones(1, 1),
                                                              torch.ones(1), Cond(1.0), None)
