"""The method on a tiny guidance-embedded FLUX: pair mode and torch.func.jvp give the same
differential target; embedded guidance reaches teacher and student; targets and the sampler
run with the real callables."""
import copy
import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402

from meanflow.method import (DiscreteTargetConfig, GuidanceConfig, GuidedTeacher, SamplerConfig,  # noqa: E402
                             differential_target, discrete_target, sample, sample_times,
                             tangent_along_v, tangent_along_v_pair)
from meanflow.models.flux_student import FluxCondition, FluxStudent, FluxTeacher  # noqa: E402

D = torch.float64
TINY = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=True)


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stock = FluxTransformer2DModel(**TINY).to(D)
    student = FluxStudent.from_transformer(copy.deepcopy(stock))
    with torch.no_grad():  # so that r matters
        g = torch.Generator().manual_seed(7)
        for p in student.delta_embedder.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    yield student, FluxTeacher(stock)
    torch.set_num_threads(threads)


def _inputs(batch=3, h=2, w=3, text=4):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(h, w, 3, dtype=D)
    ids[..., 1] = torch.arange(h, dtype=D)[:, None]
    ids[..., 2] = torch.arange(w, dtype=D)[None, :]
    cond = FluxCondition(encoder_hidden_states=torch.randn(batch, text, 32, generator=g, dtype=D),
                         pooled_projections=torch.randn(batch, 32, generator=g, dtype=D),
                         txt_ids=torch.zeros(text, 3, dtype=D), img_ids=ids.reshape(-1, 3))
    return torch.randn(batch, h * w, 4, generator=g, dtype=D), cond


def test_differential_target_pair_equals_jvp(models):
    student, teacher = models
    z, cond = _inputs()
    gt = GuidedTeacher(teacher.velocity, GuidanceConfig(mode="embedded", scales=(3.0, 4.0)))
    gen = torch.Generator().manual_seed(0)
    cond, g = gt.prepare(cond, 3, generator=gen)
    r, t = sample_times(3, generator=gen, dtype=D)
    v = gt(z, t, cond)
    assert torch.allclose(v, teacher.velocity(z, t, cond)) and cond.guidance is g

    def pair(z, r, t, z_dot, r_dot, t_dot):
        return student.forward_with_tangent(z, r, t, cond, z_dot, r_dot, t_dot)

    u_p, du_p = tangent_along_v_pair(pair, z, r, t, v)
    u_j, du_j = tangent_along_v(lambda z, r, t: student(z, r, t, cond), z, r, t, v)
    assert u_p.requires_grad and not du_p.requires_grad
    tp, tj = differential_target(v, r, t, du_p), differential_target(v, r, t, du_j)
    assert torch.allclose(tp, tj, rtol=1e-6, atol=1e-6 * tj.abs().max().item())


def test_discrete_targets_and_sampler_run(models):
    student, teacher = models
    z, cond = _inputs()
    cond = dataclasses.replace(cond, guidance=torch.full((3,), 3.5, dtype=D))
    r = torch.tensor([0.2, 0.5, 0.7], dtype=D)
    t = torch.tensor([0.9, 0.5, 1.0], dtype=D)
    v = teacher.velocity(z, t, cond)
    for kind in ("teacher_solver", "alphaflow", "split"):
        cfg = DiscreteTargetConfig(kind=kind, solver_steps=2, split_lambda=0.5)
        out = discrete_target(cfg, z=z, r=r, t=t, v=v, velocity=lambda z, t: teacher.velocity(z, t, cond),
                              student=lambda z, r, t: student(z, r, t, cond))
        assert out.shape == z.shape and torch.isfinite(out).all() and not out.requires_grad
        assert torch.equal(out[1], v[1])  # the r = t row
    with torch.no_grad():
        x = sample(student, z, cond=cond, config=SamplerConfig(steps=2, shift="flux"), image_seq_len=6)
    assert x.shape == z.shape and torch.isfinite(x).all()
