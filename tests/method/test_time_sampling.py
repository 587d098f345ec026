"""Time sampler statistics."""
import math

import pytest
import torch

from meanflow.method import TimeSamplerConfig, sample_times


def test_statistics():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    r, t = sample_times(n, TimeSamplerConfig(), generator=g, dtype=torch.float64)
    assert r.shape == t.shape == (n,) and r.dtype == torch.float64
    assert bool((r <= t).all()) and bool((r > 0).all()) and bool((t < 1).all())
    equal = r == t
    assert int(equal.sum()) == round(0.25 * n)
    # Rows with r != t: logit(r), logit(t) are the min / max of two N(−0.4, 1) draws:
    # E[max] = μ + σ/√π, E[min] = μ − σ/√π; the pooled pair is N(μ, σ²).
    lt, lr = torch.logit(t[~equal]), torch.logit(r[~equal])
    assert abs(lt.mean().item() - (-0.4 + 1 / math.sqrt(math.pi))) < 0.01
    assert abs(lr.mean().item() - (-0.4 - 1 / math.sqrt(math.pi))) < 0.01
    pooled = torch.cat([lt, lr])
    assert abs(pooled.mean().item() + 0.4) < 0.01 and abs(pooled.std().item() - 1.0) < 0.01


def test_seeded_and_fraction_options():
    a = sample_times(64, generator=torch.Generator().manual_seed(5))
    b = sample_times(64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].dtype == torch.float32
    r, t = sample_times(10, TimeSamplerConfig(equal_fraction=1.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(r, t)
    r, t = sample_times(10, TimeSamplerConfig(equal_fraction=0.0), generator=torch.Generator().manual_seed(0))
    assert bool((r < t).all())


@pytest.mark.parametrize("kwargs,name", [({"std": 0.0}, "std"), ({"equal_fraction": 1.5}, "equal_fraction"),
                                         ({"equal_fraction": -0.1}, "equal_fraction")])
def test_config_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TimeSamplerConfig(**kwargs)


def test_argument_errors():
    with pytest.raises(ValueError, match="batch"):
        sample_times(0)
    with pytest.raises(ValueError, match="dtype"):
        sample_times(4, dtype=torch.int64)
