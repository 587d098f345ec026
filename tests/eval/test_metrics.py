"""meanflow.eval.metrics against closed forms."""
import pytest
import torch

from meanflow.eval.metrics import diversity, frechet_distance, prompt_accuracy

torch.set_num_threads(1)


def _gaussian_exact(mean, std, n):
    """n float64 samples with exactly the given mean and per-feature (unbiased) std and zero
    cross-covariance: whitened Gaussian noise, rescaled."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    cov = torch.cov(x.T)
    w, q = torch.linalg.eigh(cov)
    x = x @ q @ torch.diag(w.rsqrt()) @ q.T  # exactly white
    return x * torch.tensor(std, dtype=torch.float64) + torch.tensor(mean, dtype=torch.float64)


def test_frechet_closed_form_diagonal():
    ma, sa = [0.0, 1.0, -2.0], [1.0, 2.0, 0.5]
    mb, sb = [1.0, 1.0, 0.0], [3.0, 1.0, 0.5]
    a, b = _gaussian_exact(ma, sa, 500), _gaussian_exact(mb, sb, 700)
    expected = sum((x - y) ** 2 for x, y in zip(ma, mb)) + sum((x - y) ** 2 for x, y in zip(sa, sb))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_full_covariance_against_scipy_free_formula():
    # Σa = I, Σb = A Aᵀ: FD = ‖μ‖² + F + tr Σb − 2 tr Σb^½, tr Σb^½ = Σ sqrt(eig Σb).
    g = torch.Generator().manual_seed(1)
    a = torch.randn(400, 4, generator=g, dtype=torch.float64)
    b = torch.randn(300, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 4, generator=g, dtype=torch.float64) + 2
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    wa, qa = torch.linalg.eigh(ca)
    ra = qa @ torch.diag(wa.sqrt()) @ qa.T
    cross = torch.linalg.eigvalsh(ra @ cb @ ra).sqrt().sum()
    expected = float((a.mean(0) - b.mean(0)).square().sum() + ca.trace() + cb.trace() - 2 * cross)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(a.float(), b.float()) == pytest.approx(expected, rel=1e-4)


def test_frechet_zero_and_symmetric():
    x = torch.randn(50, 8)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    y = torch.randn(60, 8) * 2 + 1
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)
    assert frechet_distance(x, y) > 1.0
    # degenerate covariance (rank-deficient features) is fine
    z = torch.zeros(10, 3)
    z[:, 0] = torch.arange(10.0)
    assert frechet_distance(z, z) == pytest.approx(0.0, abs=1e-9)


def test_frechet_errors():
    with pytest.raises(ValueError, match="feats_a"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="feats_b"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="feats_a"):
        frechet_distance(torch.zeros(5), torch.zeros(5, 1))


def test_prompt_accuracy():
    logits = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert prompt_accuracy(logits, torch.tensor([1, 0, 0, 0])) == 0.75
    assert prompt_accuracy(logits, torch.tensor([0, 1, 0, 1])) == 0.0
    with pytest.raises(ValueError, match="labels"):
        prompt_accuracy(logits, torch.tensor([1, 0, 0]))
    with pytest.raises(ValueError, match="labels"):
        prompt_accuracy(logits, torch.tensor([1.0, 0, 0, 0]))


def test_diversity():
    labels = torch.tensor([0, 0, 0, 1, 1])
    same = torch.ones(5, 4)
    assert diversity(same, labels) == 0.0
    feats = torch.tensor([[0.0, 0], [3, 4], [0, 0], [1, 0], [1, 0]])
    # label 0: pairwise distances 5, 0, 5 -> mean 10/3; label 1: 0 -> mean over labels 5/3
    assert diversity(feats, labels) == pytest.approx(5 / 3)
    assert diversity(torch.randn(40, 3), torch.arange(40) % 4) > 0
    assert diversity(torch.randn(3, 3), torch.tensor([0, 1, 2])) == 0.0
    with pytest.raises(ValueError, match="labels"):
        diversity(feats, labels[:3])


def test_non_finite_features_give_nan_or_count_as_wrong():
    """A diverged model's NaN samples: FD is NaN (the eigensolver used to raise and end the
    whole evaluation), a NaN logit row is a wrong answer (argmax used to pick the NaN as the top
    class: [nan, 0] read as class 0), diversity is NaN."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(20, 3, generator=g, dtype=torch.float64)
    b = torch.randn(30, 3, generator=g, dtype=torch.float64)
    bad = a.clone()
    bad[4, 1] = float("nan")
    assert frechet_distance(bad, b) != frechet_distance(bad, b)  # NaN
    inf = a.clone()
    inf[0, 0] = float("inf")
    assert frechet_distance(b, inf) != frechet_distance(b, inf)
    logits = torch.tensor([[float("nan"), 0.0], [2.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert prompt_accuracy(logits, torch.tensor([0, 0, 1, 1])) == pytest.approx(2 / 4)
    assert diversity(bad, torch.zeros(20, dtype=torch.long)) != diversity(bad, torch.zeros(20, dtype=torch.long))
