"""A small CNN classifier of the digits, the feature extractor of the world's metrics.

Its penultimate features (64-d) play the role Inception features play in FID; its logits give
the prompt accuracy of generated samples. Trained by :func:`train_classifier` with ±1-pixel
shift augmentation; the shipped weights are ``assets/classifier.safetensors``.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from meanflow.digits._io import ASSETS, load_state, save_modules
from meanflow.digits.data import load_split

__all__ = ["DigitsClassifier", "train_classifier", "evaluate_classifier", "save_classifier",
           "load_classifier", "CLASSIFIER_PATH"]

CLASSIFIER_PATH = os.path.join(ASSETS, "classifier.safetensors")


class DigitsClassifier(nn.Module):
    """conv3×3(32)-ReLU, conv3×3(64)-ReLU, maxpool → 4×4, conv3×3(64)-ReLU, maxpool → 2×2,
    Linear(256 → 64)-ReLU (the features), Linear(64 → 10) (the logits)."""

    def __init__(self, width: int = 32, features: int = 64):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width: expected a positive int, got {width!r}")
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features: expected a positive int, got {features!r}")
        self.config = {"width": width, "features": features}
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 4, features)
        self.head = nn.Linear(features, 10)

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features.

        Args:
            images: (B, 1, 8, 8) floating point in [-1, 1].

        Returns:
            (B, features) in the parameters' dtype (non-negative: after ReLU).
        """
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (1, 8, 8) \
                or not images.is_floating_point():
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images: expected a floating-point tensor of shape (B, 1, 8, 8), got {shape}")
        x = images.to(self.fc.weight)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, images: Tensor) -> Tensor:
        """Logits (B, 10) of images (B, 1, 8, 8) in [-1, 1]."""
        return self.head(self.features(images))


def _shift(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random shifts by −1, 0 or +1 pixel in each direction, background (−1) filled in.
    images (B, 1, 8, 8) -> (B, 1, 8, 8)."""
    b = images.shape[0]
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (b,), generator=generator)
    dx = torch.randint(0, 3, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(8)[None, :])  # (B, 8)
    cols = (dx[:, None] + torch.arange(8)[None, :])
    idx_b = torch.arange(b)[:, None, None]
    return padded[idx_b, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.no_grad()
def evaluate_classifier(classifier: DigitsClassifier, split: str = "test") -> float:
    """Top-1 accuracy (a float in [0, 1]) of ``classifier`` on a split of the digits."""
    x, y = load_split(split)
    was = classifier.training
    classifier.eval()
    acc = (classifier(x).argmax(1) == y.to(classifier.fc.weight.device)).float().mean().item()
    classifier.train(was)
    return acc


def train_classifier(seed: int = 0, epochs: int = 40, batch_size: int = 64, lr: float = 2e-3,
                     verbose: bool = False) -> tuple[DigitsClassifier, dict]:
    """Trains a :class:`DigitsClassifier` on the train split (AdamW, cosine learning rate,
    ±1-pixel shifts). Seeded and reproducible for a given thread count.

    Returns:
        the classifier (eval mode) and a dict with ``seed``, ``epochs``, ``train_seconds`` and
        ``test_accuracy``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: expected a positive int, got {epochs!r}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_split("train")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_shift(x[idx], gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"classifier epoch {epoch + 1}/{epochs} loss {loss.item():.4f}", flush=True)
    model.eval()
    info = {"seed": seed, "epochs": epochs, "train_seconds": time.perf_counter() - start,
            "test_accuracy": evaluate_classifier(model, "test")}
    return model, info


def save_classifier(path: str | os.PathLike, classifier: DigitsClassifier) -> None:
    """One safetensors file: the state dict under ``classifier.`` and its config as metadata."""
    if not isinstance(classifier, DigitsClassifier):
        raise ValueError(f"classifier: expected a DigitsClassifier, got {type(classifier).__name__}")
    save_modules(path, {"classifier": classifier}, {"classifier": classifier.config})


def load_classifier(path: str | os.PathLike | None = None) -> DigitsClassifier:
    """The classifier :func:`save_classifier` wrote (default: the shipped asset), in eval mode
    with ``requires_grad`` False."""
    states, configs = load_state(CLASSIFIER_PATH if path is None else path, ("classifier",))
    model = DigitsClassifier(**configs["classifier"])
    model.load_state_dict(states["classifier"], strict=True)
    model.eval().requires_grad_(False)
    return model
