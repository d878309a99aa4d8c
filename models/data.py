"""Real image data without downloads: scikit-learn's bundled handwritten digits.

``sklearn.datasets.load_digits`` ships 1797 real 8x8 grey-level images (values 0..16, ten classes,
174 to 183 per class) inside the scikit-learn wheel, so tests and benchmarks need no network.

Preprocessing, in this order:

1. scale to [0, 1]: ``x / 16``;
2. normalize with the statistics of all 1797 images: ``(x - DIGITS_MEAN) / DIGITS_STD`` with
   ``DIGITS_MEAN = 0.30526`` and ``DIGITS_STD = 0.37605`` (so values lie in
   ``[-0.8118, 1.8474]``);
3. upsample to ``size x size`` with bilinear interpolation (``align_corners=False``, a convex
   combination, so the range above is kept);
4. replicate the single channel ``channels`` times.

The train/test split is stratified by class and fixed by ``seed``
(``sklearn.model_selection.train_test_split``). With the default ``test_fraction=0.25``: 1347
training and 450 test images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DIGITS_MAX", "DIGITS_MEAN", "DIGITS_MIN", "DIGITS_STD", "digits_dataset", "digits_loaders"]

DIGITS_MEAN = 0.30526028624095713
"""Mean pixel value of all 1797 digits after scaling to [0, 1]."""
DIGITS_STD = 0.3760492217920148
"""Pixel standard deviation of all 1797 digits after scaling to [0, 1]."""
DIGITS_MIN = (0.0 - DIGITS_MEAN) / DIGITS_STD
"""Smallest possible normalized value (a blank pixel)."""
DIGITS_MAX = (1.0 - DIGITS_MEAN) / DIGITS_STD
"""Largest possible normalized value (a full-intensity pixel)."""


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dev dependency
        raise ImportError(
            "models.data needs scikit-learn for its bundled digits data set: pip install scikit-learn"
        ) from e
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
    targets = torch.as_tensor(digits.target, dtype=torch.int64)
    return images, targets


def _preprocess(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    x = ((images - DIGITS_MEAN) / DIGITS_STD).unsqueeze(1)  # (N, 1, 8, 8)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, channels, -1, -1).contiguous()


def digits_dataset(
    size: int = 32, channels: int = 3, seed: int = 0, test_fraction: float = 0.25
) -> tuple[TensorDataset, TensorDataset]:
    """The scikit-learn digits as normalized ``(N, channels, size, size)`` images, split train/test.

    Args:
        size: output height and width (bilinear upsampling from 8x8; 8 keeps the originals).
        channels: number of identical channels (3 for ImageNet-style models, 1 for grey).
        seed: seed of the stratified split.
        test_fraction: share of images in the test split, in (0, 1).

    Returns:
        ``(train, test)`` TensorDatasets of ``(float32 image, int64 label)``; deterministic for a given
        ``seed``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
    if size < 1 or channels < 1:
        raise ValueError(f"size={size} and channels={channels} must both be positive")
    from sklearn.model_selection import train_test_split

    images, targets = _load_digits()
    idx_train, idx_test = train_test_split(
        torch.arange(len(targets)).numpy(),
        test_size=test_fraction,
        random_state=seed,
        stratify=targets.numpy(),
    )
    x = _preprocess(images, size, channels)
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return (
        TensorDataset(x[idx_train], targets[idx_train]),
        TensorDataset(x[idx_test], targets[idx_test]),
    )


def digits_loaders(
    batch_size: int = 64,
    size: int = 32,
    channels: int = 3,
    seed: int = 0,
    test_fraction: float = 0.25,
    shuffle: bool = True,
) -> tuple[DataLoader, DataLoader]:
    """DataLoaders over :func:`digits_dataset`.

    The training loader shuffles with its own generator seeded by ``seed`` (same order every run, global
    RNG untouched); the test loader never shuffles. Both keep partial last batches.

    Args:
        batch_size: samples per batch.
        size: image height and width.
        channels: image channels.
        seed: seed of the split and of the training shuffle.
        test_fraction: share of images in the test split.
        shuffle: shuffle the training loader.

    Returns:
        ``(train_loader, test_loader)``.
    """
    train, test = digits_dataset(size=size, channels=channels, seed=seed, test_fraction=test_fraction)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=shuffle, generator=generator)
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False)
    return train_loader, test_loader
