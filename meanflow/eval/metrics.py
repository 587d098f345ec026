"""Generic sample-quality metrics on features and logits (any feature extractor, any world).

- :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two feature sets
  (FID's formula), ‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½, in float64.
- :func:`prompt_accuracy`: how often a classifier's top class is the class the prompt asked for.
- :func:`diversity`: the mean, over classes, of the mean pairwise L2 distance between features
  of samples of that class (0 when all are identical: mode collapse).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["frechet_distance", "prompt_accuracy", "diversity"]


def _matrix(x, name: str, min_rows: int = 1) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-d (N, F) tensor, got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} rows, got {x.shape[0]}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name}: expected a real tensor, got {x.dtype}")
    return x.detach().to(device="cpu", dtype=torch.float64)


def _labels(labels, n: int, name: str = "labels") -> Tensor:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != n \
            or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor of shape ({n},)")
    return labels.detach().cpu().long()


def _sqrt_psd(m: Tensor) -> Tensor:
    """The symmetric square root of a symmetric PSD (F, F) float64 matrix (tiny negative
    eigenvalues clamped to 0)."""
    w, q = torch.linalg.eigh((m + m.T) / 2)
    return (q * w.clamp_min(0).sqrt()) @ q.T


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets.

    Args:
        feats_a: (N, F) real tensor, N ≥ 2.
        feats_b: (M, F) real tensor, M ≥ 2.

    Returns:
        ‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½ as a Python float ≥ 0, computed in
        float64 with unbiased covariances; the matrix square roots by eigendecomposition of
        symmetric matrices, tiny negative eigenvalues clamped to zero. NaN when a feature is
        not finite (e.g. a diverged model's samples): no distance, rather than the
        eigensolver's error ending the whole evaluation.
    """
    a = _matrix(feats_a, "feats_a", 2)
    b = _matrix(feats_b, "feats_b", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_b: expected {a.shape[1]} features like feats_a, got {b.shape[1]}")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return float("nan")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    root_a = _sqrt_psd(cov_a)
    w = torch.linalg.eigvalsh(_sym(root_a @ cov_b @ root_a))
    cross = w.clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return max(float(fd), 0.0)


def _sym(m: Tensor) -> Tensor:
    return (m + m.T) / 2


def prompt_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of samples whose top logit is the label the prompt asked for.

    Args:
        logits: (N, C) real tensor, N ≥ 1.
        labels: (N,) integer tensor of class indices.

    Returns:
        a Python float in [0, 1]. A sample whose logits are not all finite counts as wrong
        (argmax would pick its NaN as the top class).
    """
    x = _matrix(logits, "logits", 1)
    y = _labels(labels, x.shape[0])
    correct = (x.argmax(dim=1) == y) & torch.isfinite(x).all(dim=1)
    return float(correct.double().mean())


def diversity(feats: Tensor, labels: Tensor) -> float:
    """Mean over the labels present of the mean pairwise L2 distance between the features of
    the samples with that label (labels with a single sample are skipped).

    Args:
        feats: (N, F) real tensor.
        labels: (N,) integer tensor.

    Returns:
        a Python float ≥ 0 (0 when every label's features are identical, or no label has two
        samples), computed in float64; NaN when a feature used is not finite.
    """
    x = _matrix(feats, "feats", 1)
    y = _labels(labels, x.shape[0])
    per_label = []
    for c in torch.unique(y):
        f = x[y == c]
        n = f.shape[0]
        if n < 2:
            continue
        d = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")
        per_label.append(d.sum() / (n * (n - 1)))
    return float(torch.stack(per_label).mean()) if per_label else 0.0
