"""The digits world's data: scikit-learn's bundled 8×8 digits, its split, and FLUX packing.

Images are float32 (N, 1, 8, 8) in [-1, 1] (pixel/8 − 1; the raw pixels are 0–16). The
"VAE" of this world is the identity: a latent is the image packed FLUX-style into 2×2
patches, 16 tokens of 4 channels (:func:`pack`, :func:`unpack`), with FLUX position ids
(0, row, col) over the 4×4 patch grid (:func:`image_ids`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["N_TRAIN", "N_TEST", "SPLIT_SEED", "load_split", "pack", "unpack", "image_ids",
           "to_uint8", "grid_image"]

N_TRAIN = 1497
N_TEST = 300
SPLIT_SEED = 0
SIZE = 8
PATCH = 2
GRID = SIZE // PATCH  # 4×4 patch grid
TOKENS = GRID * GRID  # 16
CHANNELS = PATCH * PATCH  # 4 (one image channel)

_CACHE: dict[str, tuple[Tensor, Tensor]] = {}


def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def load_split(split: str) -> tuple[Tensor, Tensor]:
    """The deterministic train / test split (a fixed permutation, seed 0: 1497 / 300).

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        images: (N, 1, 8, 8) float32 in [-1, 1].
        labels: (N,) int64 in 0..9.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    if split not in _CACHE:
        images, labels = _all_digits()
        perm = np.random.RandomState(SPLIT_SEED).permutation(len(images))
        idx = perm[:N_TRAIN] if split == "train" else perm[N_TRAIN:N_TRAIN + N_TEST]
        x = torch.from_numpy(images[idx] / 8.0 - 1.0).float().unsqueeze(1).contiguous()
        y = torch.from_numpy(labels[idx]).long()
        _CACHE[split] = (x, y)
    x, y = _CACHE[split]
    return x.clone(), y.clone()


def _check_images(images, name: str = "images") -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (1, SIZE, SIZE):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected a tensor of shape (N, 1, 8, 8), got {shape}")


def pack(images: Tensor) -> Tensor:
    """FLUX 2×2 patch packing.

    Args:
        images: (N, 1, 8, 8), any dtype.

    Returns:
        latents: (N, 16, 4), same dtype: token i = (row, col) of the 4×4 patch grid in
        row-major order; channel j = (dy, dx) within the patch in row-major order.
    """
    _check_images(images)
    n = images.shape[0]
    x = images.reshape(n, GRID, PATCH, GRID, PATCH)  # n, row, dy, col, dx
    return x.permute(0, 1, 3, 2, 4).reshape(n, TOKENS, CHANNELS).contiguous()


def unpack(latents: Tensor) -> Tensor:
    """The exact inverse of :func:`pack`.

    Args:
        latents: (N, 16, 4), any dtype.

    Returns:
        images: (N, 1, 8, 8), same dtype.
    """
    if not isinstance(latents, Tensor) or latents.dim() != 3 or tuple(latents.shape[1:]) != (TOKENS, CHANNELS):
        shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"latents: expected a tensor of shape (N, 16, 4), got {shape}")
    n = latents.shape[0]
    x = latents.reshape(n, GRID, GRID, PATCH, PATCH)  # n, row, col, dy, dx
    return x.permute(0, 1, 3, 2, 4).reshape(n, 1, SIZE, SIZE).contiguous()


def image_ids() -> Tensor:
    """FLUX image position ids: (16, 3) float32, row i·4 + j is (0, i, j)."""
    ids = torch.zeros(GRID, GRID, 3, dtype=torch.float32)
    ids[..., 1] = torch.arange(GRID, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(GRID, dtype=torch.float32)[None, :]
    return ids.reshape(TOKENS, 3)


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] to 8-bit gray levels.

    Args:
        images: (N, 1, 8, 8) floating point (values outside [-1, 1] are clipped).

    Returns:
        (N, 8, 8) uint8 in [0, 255].
    """
    _check_images(images)
    if not images.is_floating_point():
        raise ValueError(f"images: expected a floating-point tensor, got {images.dtype}")
    x = (images.detach().float().cpu()[:, 0].clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8)


def grid_image(images: Tensor, nrow: int = 10, scale: int = 4, gutter: int = 1):
    """A sample grid as a PIL image (mode "L"): each image upscaled ×``scale`` (nearest) and
    separated by ``gutter``-pixel gray gutters.

    Args:
        images: (N, 1, 8, 8) floating point in [-1, 1].
        nrow: images per row (≥ 1).
        scale, gutter: upscale factor (≥ 1) and gutter width in pixels (≥ 0).
    """
    from PIL import Image

    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow: expected a positive int, got {nrow!r}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale: expected a positive int, got {scale!r}")
    if isinstance(gutter, bool) or not isinstance(gutter, int) or gutter < 0:
        raise ValueError(f"gutter: expected a non-negative int, got {gutter!r}")
    pix = to_uint8(images).numpy()
    n = pix.shape[0]
    if n == 0:
        raise ValueError("images: expected at least one image")
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    cell = SIZE * scale
    canvas = np.full((rows * cell + (rows + 1) * gutter, ncol * cell + (ncol + 1) * gutter), 128, np.uint8)
    for k in range(n):
        i, j = divmod(k, ncol)
        y0, x0 = gutter + i * (cell + gutter), gutter + j * (cell + gutter)
        canvas[y0:y0 + cell, x0:x0 + cell] = np.kron(pix[k], np.ones((scale, scale), np.uint8))
    return Image.fromarray(canvas)
