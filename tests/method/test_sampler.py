"""The few-step sampler with the exact average velocity; time grids."""
import math

import pytest
import torch

from meanflow.method import GaussianOracle, SamplerConfig, flux_mu, sample, shift_times, time_grid

D = torch.float64


def _oracle():
    return GaussianOracle(mean=torch.tensor([2.0, -1.0, 0.5], dtype=D),
                          std=torch.tensor([0.5, 2.0, 0.1], dtype=D))


@pytest.mark.parametrize("steps,shift", [(1, "none"), (2, "none"), (4, "flux")])
def test_exact_u_lands_on_the_flow_map(steps, shift):
    orc = _oracle()
    eps = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=D)
    out = sample(orc, eps, config=SamplerConfig(steps=steps, shift=shift), image_seq_len=1024)
    assert torch.allclose(out, orc.flow_map(eps, 0.0, 1.0), atol=1e-12)


def test_one_step_sample_distribution():
    orc = _oracle()
    eps = torch.randn(200_000, 3, generator=torch.Generator().manual_seed(1), dtype=D)
    x = sample(orc, eps)
    assert torch.allclose(x.mean(0), torch.tensor([2.0, -1.0, 0.5], dtype=D), atol=0.01)
    assert torch.allclose(x.std(0), torch.tensor([0.5, 2.0, 0.1], dtype=D), rtol=0.01)


def test_conditioning_times_and_trajectory():
    calls = []

    def u(z, r, t, cond):
        calls.append((r.clone(), t.clone(), cond))
        return torch.ones_like(z)

    z0 = torch.zeros(2, 4)
    z, traj = sample(u, z0, torch.tensor([1.0, 0.75, 0.0]), cond="c", return_trajectory=True)
    assert len(traj) == 3 and torch.allclose(z, -torch.ones(2, 4))
    (r0, t0, c0), (r1, t1, _) = calls
    assert c0 == "c" and r0.dtype == torch.float32 and r0.shape == (2,)
    assert torch.equal(t0, torch.ones(2)) and torch.equal(r0, torch.full((2,), 0.75))
    assert torch.equal(t1, torch.full((2,), 0.75)) and torch.equal(r1, torch.zeros(2))


def test_grids():
    assert torch.allclose(time_grid(SamplerConfig(steps=4)), torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=D))
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    mu = flux_mu(1024)
    tau = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=D)
    shifted = shift_times(tau, mu)
    e = math.exp(mu)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert shifted[1].item() == pytest.approx(e / (e + (1 / 0.3 - 1)))
    grid = time_grid(SamplerConfig(steps=4, shift="flux"), image_seq_len=4096)
    assert bool((grid[1:-1] > torch.tensor([0.75, 0.5, 0.25], dtype=D)).all())
    unshifted = time_grid(SamplerConfig(steps=3, shift="fixed", mu=0.0))
    assert torch.allclose(unshifted, time_grid(SamplerConfig(steps=3)))


def test_errors():
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError, match="shift"):
        SamplerConfig(shift="sd3")
    with pytest.raises(ValueError, match="image_seq_len"):
        time_grid(SamplerConfig(shift="flux"))
    with pytest.raises(ValueError, match="grid"):
        sample(lambda z, r, t: z, torch.zeros(1, 2), torch.tensor([0.0, 1.0]))
