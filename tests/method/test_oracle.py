"""The Gaussian oracle's closed forms against numerical integration and sampling."""
import pytest
import torch

from meanflow.method import GaussianOracle

D = torch.float64


def _oracle():
    return GaussianOracle(mean=torch.tensor([0.7, -1.2, 0.0]), std=torch.tensor([0.3, 1.5, 0.05]))


def _integrate(orc, z, t0, t1, n, method):
    """n Euler or classical RK4 steps of dz/dτ = v(z, τ) from τ = t0 down to t1."""
    h = (t0 - t1) / n
    tau = t0
    for _ in range(n):
        if method == "euler":
            z = z - h * orc.velocity(z, tau)
        else:
            k1 = orc.velocity(z, tau)
            k2 = orc.velocity(z - h / 2 * k1, tau - h / 2)
            k3 = orc.velocity(z - h / 2 * k2, tau - h / 2)
            k4 = orc.velocity(z - h * k3, tau - h)
            z = z - h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        tau -= h
    return z


def test_velocity_is_conditional_expectation():
    g = torch.Generator().manual_seed(1)
    orc = _oracle()
    n, t = 400_000, 0.4
    x = orc.data((n, 3), g)
    eps = torch.randn(n, 3, generator=g, dtype=D)
    z = orc.sample(t, eps, x)
    # The regression of ε − x on z is affine: E[(ε − x − v(z)) · (1, z)] = 0.
    resid = (eps - x) - orc.velocity(z, t)
    assert resid.mean(0).abs().max() < 0.01
    assert (resid * (z - z.mean(0))).mean(0).abs().max() < 0.01


@pytest.mark.parametrize("method,steps,atol", [("euler", 2000, 3e-3), ("rk4", 200, 1e-9)])
def test_flow_map_matches_integrated_velocity(method, steps, atol):
    g = torch.Generator().manual_seed(2)
    orc = _oracle()
    z = torch.randn(5, 3, generator=g, dtype=D)
    t, r = 0.9, 0.15
    ref = _integrate(orc, z, t, r, steps, method)
    assert torch.allclose(orc.flow_map(z, r, t), ref, atol=atol)
    u = orc.average_velocity(z, r, t)
    assert torch.allclose(u, (z - ref) / (t - r), atol=2 * atol)


def test_flow_map_pushes_noise_to_data():
    g = torch.Generator().manual_seed(3)
    orc = _oracle()
    eps = torch.randn(200_000, 3, generator=g, dtype=D)
    x = orc.flow_map(eps, 0.0, 1.0)
    assert torch.allclose(x.mean(0), torch.tensor([0.7, -1.2, 0.0], dtype=D), atol=0.01)
    assert torch.allclose(x.std(0), torch.tensor([0.3, 1.5, 0.05], dtype=D), rtol=0.01)


def test_average_velocity_at_r_equals_t_is_velocity_and_matches_quotient():
    g = torch.Generator().manual_seed(4)
    orc = _oracle()
    z = torch.randn(6, 3, generator=g, dtype=D)
    t = torch.rand(6, generator=g, dtype=D) * 0.9 + 0.05
    r = t * torch.rand(6, generator=g, dtype=D)
    assert torch.allclose(orc.average_velocity(z, t, t), orc.velocity(z, t), atol=1e-13)
    quotient = (z - orc.flow_map(z, r, t)) / (t - r)[:, None]
    assert torch.allclose(orc.average_velocity(z, r, t), quotient, atol=1e-10)


def test_bad_std():
    with pytest.raises(ValueError, match="std"):
        GaussianOracle(std=0.0)
