"""Paper ablation (Quant-Trim, Table 9 and Figs. 8-9) on real data, across backends.

    python benchmarks/paper_ablation.py                 # full run: 3 seeds, every configuration, RESULTS.md
    python benchmarks/paper_ablation.py --quick         # 1 seed, 2 configurations, tiny model (smoke test)

A CIFAR-style ResNet-18 (``models.cifar_resnet18``, small width) is trained on scikit-learn's real
handwritten digits (``models.data``, upsampled to 16x16, one fixed stratified split) once per
configuration of the paper's Table 9 and seed:

* ``fp32``  FP32 baseline, then post-training quantization (``qtrim_fx.calibrate`` + export);
* ``rp``    reverse pruning only (λ kept at 0 the whole run), then the same PTQ;
* ``qat``   progressive fake quantization only (``Curriculum``, no ``ReversePruner``);
* ``qt90`` / ``qt95`` / ``qt99``  QAT + reverse pruning at p_clip 0.90 / 0.95 / 0.99 (``qt95`` is the
  paper's Quant-Trim recipe);

plus ONNX Runtime's own ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, U8 activations,
S8 weights, MinMax) on the FP32 baseline's ONNX file as the anchor. Every model is exported W8A8
(``export_onnx``) and W4A8 (``QuantConfig(weight_bits=4)``, opset 21; fake-quant configurations are
retrained at 4 bits, PTQ ones only re-calibrated), run on ONNX Runtime and OpenVINO (and QNN when
``QTRIM_QNN_PYTHON`` is set) and compared with its own FP32 ONNX file (``verify``) and with the labels.

The training loop is the README's, with the user's own optimizer and epoch function::

    qm = qtrim_fx.prepare(model, config=config)
    trim = qtrim_fx.QuantTrim(qm, curriculum, pruner)
    for epoch in range(epochs):
        trim.epoch_start(epoch)          # λ_t, and pins weight tails on pin epochs
        train_one_epoch(qm, ...)
    qtrim_fx.export_onnx(qm, (x,), "model.qdq.onnx", target="onnxruntime")

Metrics (test split, 450 images): top-1 accuracy; logit MSE, SQNR and top-1 agreement against the
model's own FP32 ONNX file (``qtrim_fx.verify``; the paper's "MSE between device and ONNX FP32
logits"); Brier score (sum over classes of squared probability error, averaged over images); ECE
(15 equal-width confidence bins); cross-backend top-1 agreement (``verify``'s backend pairs). The
per-epoch curves of Fig. 8 use a validation split carved from the training split; no choice is made
on the test split (every model is its last epoch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_section
from qtrim_fx.models import cifar_resnet18
from qtrim_fx.models.data import digits_dataset
from qtrim_fx.models.vit import VisionTransformer

import qtrim_fx

PLOTS = Path(__file__).resolve().parent / "plots"
SECTION = "Paper ablation"
SPLIT_SEED = 0  # the train/val/test split is the same for every seed; seeds change init and order
ECE_BINS = 15
LOGIT_BACKENDS = ("onnxruntime", "openvino")  # run here for accuracy/Brier/ECE; verify adds fidelity


# --- configurations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ablation:
    """One row of the paper's Table 9."""

    key: str
    label: str
    fake_quant: bool  # progressive fake quantization (Curriculum) during training
    p_clip: float | None  # reverse pruning threshold; None = no pruner


ABLATIONS = {
    a.key: a
    for a in (
        Ablation("fp32", "FP32 + PTQ (qtrim calibrate)", False, None),
        Ablation("rp", "RP only (0.95) + PTQ", False, 0.95),
        Ablation("qat", "QAT only", True, None),
        Ablation("qt90", "QAT + RP 0.90", True, 0.90),
        Ablation("qt95", "QAT + RP 0.95 (Quant-Trim)", True, 0.95),
        Ablation("qt99", "QAT + RP 0.99", True, 0.99),
        Ablation("qt97", "QAT + RP 0.97 (transformer Quant-Trim)", True, 0.97),
    )
}
ANCHOR = Ablation("ort", "FP32 + ORT quantize_static", False, None)
QUANT_TRIM, PTQ, QAT_ONLY, FP32 = "qt95", "fp32", "qat", "fp32"


@dataclass(frozen=True)
class Recipe:
    """Training recipe: the paper's CNN recipe (Tables 7-8) scaled to a short CPU schedule.

    The paper trains 100 epochs with E_w, E_f, H = 10, 50, 20 and K = 5; we keep those as fractions of
    the run (E_w = 0.1 E, E_f = 0.5 E, H = 0.2 E, K = 0.05 E, each at least 1). Statistics are updated
    every 4th step (``QuantConfig.update_every``): the observers otherwise cost ~3x the training step
    of this small model on 2 cores. The EMA momentum μ is set so the statistics forget over about one
    epoch (18 steps, ~5 updates): the paper's μ = 1e-3..1e-2 spans 100..1000 steps of a 390-step CIFAR
    epoch, and μ = 1e-2 here would lag the weights by ~20 epochs, longer than the whole run.
    """

    width: int = 8
    image_size: int = 16
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-2
    momentum: float = 0.2
    update_every: int = 4
    calib_batches: int = 8
    p_lo: float = 0.001  # activation quantile levels (QuantConfig defaults); p_hi is also the |w| level
    p_hi: float = 0.999
    arch: str = "resnet18"  # or "vit" (the transformer recipe, see VIT)
    warmup_frac: float = 0.1  # E_w as a fraction of the run
    max_blend: float = 1.0  # α_max, the cap on λ
    quant_trim: str = "qt95"  # the configuration the goals are checked on

    @property
    def warmup(self) -> int:
        return max(1, round(self.warmup_frac * self.epochs))

    @property
    def ramp_end(self) -> int:
        return max(self.warmup + 1, round(0.5 * self.epochs))

    @property
    def horizon(self) -> int:
        return max(1, round(0.2 * self.epochs))

    @property
    def every(self) -> int:
        return max(1, round(0.05 * self.epochs))

    def curriculum(self) -> qtrim_fx.Curriculum:
        return qtrim_fx.Curriculum(warmup=self.warmup, ramp_end=self.ramp_end, horizon=self.horizon,
                                   max_blend=self.max_blend)

    def model(self) -> nn.Module:
        if self.arch == "vit":
            return VisionTransformer(image_size=self.image_size, patch_size=4, num_classes=10, dim=self.width,
                                     depth=4, num_heads=4, mlp_ratio=2.0)
        return cifar_resnet18(self.width, num_classes=10, in_channels=3)

    def fp32_curriculum(self) -> qtrim_fx.Curriculum:
        # λ_t = 0 for every epoch we train: FP32 training (reverse pruning may still run).
        return qtrim_fx.Curriculum(warmup=self.epochs, ramp_end=self.epochs + 1, horizon=1)

    def config(self, weight_bits: int) -> qtrim_fx.QuantConfig:
        return qtrim_fx.QuantConfig(weight_bits=weight_bits, momentum=self.momentum,
                                    update_every=self.update_every, p_lo=self.p_lo, p_hi=self.p_hi)

    def describe(self) -> str:
        net = (f"ViT(dim={self.width}, depth 4, 4 heads, patch 4)" if self.arch == "vit"
               else f"cifar_resnet18(width={self.width})")
        return (f"{net} at {self.image_size}x{self.image_size}, {self.epochs} "
                f"epochs, batch {self.batch_size}, AdamW lr {self.lr:g} wd {self.weight_decay:g} cosine; "
                f"Curriculum(E_w={self.warmup}, E_f={self.ramp_end}, H={self.horizon}"
                f"{f', α_max={self.max_blend:g}' if self.max_blend < 1 else ''}); ReversePruner(K="
                f"{self.every}, start=E_w); QuantConfig(momentum={self.momentum:g}, update_every="
                f"{self.update_every}, p_lo={self.p_lo:g}, p_hi={self.p_hi:g}); PTQ calibration: {self.calib_batches} training batches")


FULL = Recipe()
# The paper's transformer recipe (Table 8): longer warm-up, p_clip 0.96-0.98, lower μ, α_max ≈ 0.8.
VIT = Recipe(arch="vit", width=64, warmup_frac=0.2, momentum=0.1, max_blend=0.8, quant_trim="qt97")
QUICK = Recipe(width=4, epochs=3, calib_batches=2)


# --- data ----------------------------------------------------------------------------------------


@dataclass
class Data:
    train: TensorDataset
    val: TensorDataset
    test_x: torch.Tensor
    test_y: np.ndarray

    def train_loader(self, batch_size: int, seed: int) -> DataLoader:
        return DataLoader(self.train, batch_size=batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(seed))

    def calibration(self, recipe: Recipe) -> list[torch.Tensor]:
        loader = DataLoader(self.train, batch_size=recipe.batch_size, shuffle=False)
        return [x for (x, _), _ in zip(loader, range(recipe.calib_batches), strict=False)]


def load_data(image_size: int) -> Data:
    """Digits: the fixed stratified train/test split, and 15 % of train held out for the curves."""
    train, test = digits_dataset(size=image_size, channels=3, seed=SPLIT_SEED)
    x, y = train.tensors
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = round(0.15 * len(y))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return Data(TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx]),
                test.tensors[0], test.tensors[1].numpy())


# --- training: the user's loop -------------------------------------------------------------------


def train_one_epoch(net: nn.Module, loader: DataLoader, opt, sched) -> None:
    net.train()
    for x, y in loader:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


@torch.no_grad()
def validate(net: nn.Module, data: TensorDataset) -> tuple[float, float]:
    net.eval()
    x, y = data.tensors
    logits = net(x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


@dataclass
class Trained:
    model: nn.Module  # the float module (its parameters are the prepared model's)
    qm: nn.Module  # the prepared model, trained (fake quant) or about to be calibrated (PTQ)
    history: list[tuple[int, float, float, float]] = field(default_factory=list)  # epoch, λ, acc, loss
    seconds: float = 0.0


def train(ab: Ablation, recipe: Recipe, data: Data, seed: int, weight_bits: int = 8) -> Trained:
    """Train one configuration with the public API, as the README shows it."""
    torch.manual_seed(seed)
    model = recipe.model()
    qm = qtrim_fx.prepare(model, config=recipe.config(weight_bits))
    curriculum = recipe.curriculum() if ab.fake_quant else recipe.fp32_curriculum()
    pruner = None
    if ab.p_clip is not None:
        pruner = qtrim_fx.ReversePruner(p_clip=ab.p_clip, every=recipe.every, start=recipe.warmup, seed=seed)
    trim = qtrim_fx.QuantTrim(qm, curriculum, pruner)
    # While λ = 0 the prepared model computes exactly `model` (same parameters); FP32 configurations
    # train `model` itself so the observers' per-step statistics cost is not paid for nothing.
    net = qm if ab.fake_quant else model
    loader = data.train_loader(recipe.batch_size, seed)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs * len(loader))
    out = Trained(model, qm)
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        lam = trim.epoch_start(epoch)  # sets λ_t; pins weight tails on pin epochs
        train_one_epoch(net, loader, opt, sched)
        acc, loss = validate(net, data.val)
        out.history.append((epoch, lam, acc, loss))
    out.seconds = time.perf_counter() - start
    return out


def post_training_quantize(model: nn.Module, recipe: Recipe, data: Data, weight_bits: int) -> nn.Module:
    """PTQ of a float model: prepare + calibrate on training batches (the model is not changed)."""
    qm = qtrim_fx.prepare(model.eval(), config=recipe.config(weight_bits))
    qtrim_fx.calibrate(qm, data.calibration(recipe))
    return qm


# --- export --------------------------------------------------------------------------------------


IO_NAMES = {"input_names": ["input"], "output_names": ["logits"]}


def export_fp32(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **IO_NAMES)
    return path


def export_qdq(qm: nn.Module, example: torch.Tensor, path: Path, weight_bits: int) -> Path:
    """One checkpoint, one QDQ file per runtime's target profile (``<path>`` for ONNX Runtime and
    ``<name>.openvino.qdq.onnx`` for OpenVINO), as a user exports for each deployment."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opset = 21 if weight_bits == 4 else None  # INT4 initializers need opset 21
        for backend in LOGIT_BACKENDS:
            qtrim_fx.export_onnx(qm, (example,), target_file(path, backend, own=True), target=backend,
                                 opset=opset, **IO_NAMES)
    return path


def target_file(path: Path, backend: str, own: bool = False) -> Path:
    """The file a backend runs: our exports have one per target profile; the ORT anchor one for all."""
    if backend == "onnxruntime":
        return path
    mine = path.with_name(path.name.replace(".qdq.onnx", f".{backend}.qdq.onnx"))
    return mine if own or mine.exists() else path


def ort_quantize_static(fp32: Path, out: Path, calib: list[torch.Tensor], weight_bits: int) -> Path:
    """The anchor: ONNX Runtime's static QDQ quantizer on the FP32 ONNX file (MinMax calibration)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x.numpy()} for x in calib])

        def get_next(self):
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre))
    except Exception:  # ORT's symbolic shape inference rejects some graphs (the ViT's reshapes): skip it
        pre = fp32
    src = pre
    if weight_bits == 4:  # INT4 QDQ needs opset 21
        import onnx

        m = onnx.version_converter.convert_version(onnx.load(str(pre)), 21)
        src = out.with_suffix(".op21.onnx")
        onnx.save(m, str(src))
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt4 if weight_bits == 4 else QuantType.QInt8)
    return out


# --- evaluation ----------------------------------------------------------------------------------


def run_logits(backend: str, path: Path, x: np.ndarray) -> np.ndarray:
    """Logits of one backend, run the way verify runs it (ORT all optimizations; OpenVINO CPU f32)."""
    if backend == "onnxruntime":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})[0]
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled.create_infer_request().infer({0: x})[compiled.outputs[0]])


def classification_metrics(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(p.shape[1])[y]
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == y).astype(np.float64)
    bins = np.clip(np.ceil(conf * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)
    ece = sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
              for b in range(ECE_BINS) if (bins == b).any())
    brier = float(((p - onehot) ** 2).sum(1).mean())
    return {"top1": 100.0 * correct.mean(), "brier": brier, "ece": float(ece)}


def backends_to_verify() -> list[str]:
    return [*LOGIT_BACKENDS, *(["qnn"] if os.environ.get("QTRIM_QNN_PYTHON") else [])]


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref, err = ref.astype(np.float64), test.astype(np.float64) - ref
    return math.inf if not err.any() else 10.0 * math.log10(float((ref**2).sum() / (err**2).sum()))


FAILURES: list[str] = []  # backend failures of this run, listed in the report's notes


def evaluate(qdq: Path, fp32: Path, data: Data, fake_quant: nn.Module | None = None) -> dict[str, float]:
    """Every figure of one exported model: per backend vs labels and vs its FP32 ONNX, and across backends.

    ``fake_quant``: the prepared torch model at λ = 1; its logits against ONNX Runtime's give the
    train/deploy parity (does the exported graph compute what the fake-quant model computes?).
    """
    x = data.test_x.numpy()
    out: dict[str, float] = {}
    by_backend: dict[str, np.ndarray] = {}
    for b in LOGIT_BACKENDS:
        try:
            logits = by_backend[b] = run_logits(b, target_file(qdq, b), x)
        except Exception as e:  # a runtime that cannot compile a file: its cells read n/a, the notes say why
            FAILURES.append(f"{qdq.name} on {b}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")
            continue
        out.update({f"{k}_{b}": v for k, v in classification_metrics(logits, data.test_y).items()})
        if fake_quant is not None and b == "onnxruntime":
            with torch.no_grad():
                out["parity_sqnr"] = sqnr_db(fake_quant.eval()(data.test_x).numpy(), logits)
    for b in backends_to_verify():  # each backend on its own target's file, against the FP32 ONNX
        report = qtrim_fx.verify(target_file(qdq, b), fp32, [data.test_x], backends=[b])
        for r in report.backends:
            if r.status != "ok":
                FAILURES.append(f"{target_file(qdq, b).name} on {r.backend} (verify): {r.status}: "
                                f"{str(r.message).strip()[:200]}")
                continue
            o = r.outputs[0]
            out.update({f"mse_{r.backend}": o.mse, f"sqnr_{r.backend}": o.sqnr_db,
                        f"agree_{r.backend}": 100.0 * o.top1})
    a, b = LOGIT_BACKENDS
    if a in by_backend and b in by_backend:  # the deployed files' classes on the two runtimes
        out[f"pair_{a}_{b}"] = 100.0 * float((by_backend[a].argmax(1) == by_backend[b].argmax(1)).mean())
    return out


def evaluate_fp32(fp32: Path, data: Data) -> dict[str, float]:
    m = classification_metrics(run_logits("onnxruntime", fp32, data.test_x.numpy()), data.test_y)
    return {f"{k}_fp32": v for k, v in m.items()}


# --- one seed ------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    bits: int
    seed: int
    figures: dict[str, float]


def weight_snapshot(model: nn.Module) -> list[np.ndarray]:
    return [m.weight.detach().numpy().copy() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def run_seed(seed: int, recipe: Recipe, keys: list[str], w4_keys: list[str], data: Data, work: Path,
             log) -> tuple[list[Row], dict, dict]:
    rows: list[Row] = []
    histories: dict[str, list] = {}
    weights: dict[str, list[np.ndarray]] = {}
    example = data.test_x[:2]
    calib = data.calibration(recipe)

    def add(ab: Ablation, bits: int, qdq: Path, fp32: Path, fp32_figures: dict, fq: nn.Module | None) -> None:
        figures = {**fp32_figures, **evaluate(qdq, fp32, data, fq)}
        rows.append(Row(ab.key, ab.label, bits, seed, figures))
        f = lambda k: figures.get(k, math.nan)  # noqa: E731  (a backend that failed has no figures)
        log(f"  seed {seed} W{bits}A8 {ab.label:30s} FP32 {f('top1_fp32'):.2f}  ORT "
            f"{f('top1_onnxruntime'):.2f}  OV {f('top1_openvino'):.2f}  MSE {f('mse_onnxruntime'):.3e}")

    for key in keys:
        ab = ABLATIONS[key]
        # Fake-quant configurations train at the bits they deploy; PTQ ones train once, in float.
        trained_bits = (8, 4) if (ab.fake_quant and key in w4_keys) else (8,)
        for bits in trained_bits:
            t = train(ab, recipe, data, seed, bits)
            log(f"  seed {seed} W{bits} {ab.label}: trained in {t.seconds:.0f} s "
                f"(val acc {100 * t.history[-1][2]:.2f} %)")
            fp32 = export_fp32(t.model, example, work / f"{key}_w{bits}_s{seed}.fp32.onnx")
            fp32_figures = evaluate_fp32(fp32, data)
            if bits == 8:
                histories[key] = t.history
                weights[key] = weight_snapshot(t.model)
            export_bits = (bits,) if ab.fake_quant else ((8, 4) if key in w4_keys else (8,))
            for b in export_bits:
                qm = t.qm if ab.fake_quant else post_training_quantize(t.model, recipe, data, b)
                qdq = export_qdq(qm, example, work / f"{key}_w{b}_s{seed}.qdq.onnx", b)
                qtrim_fx.set_blend(qm, 1.0)  # full fake quant: the torch twin of the export (parity check)
                add(ab, b, qdq, fp32, fp32_figures, qm)
                if key == FP32:
                    anchor = ort_quantize_static(fp32, work / f"ort_w{b}_s{seed}.qdq.onnx", calib, b)
                    add(ANCHOR, b, anchor, fp32, fp32_figures, None)
    return rows, histories, weights


# --- tables --------------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(values: list[float], kind: str) -> str:
    m, s = mean_sd(values)
    if math.isnan(m):
        return "n/a"
    if kind == "pct":
        return f"{m:.2f} ± {s:.2f}"
    if kind == "db":
        return f"{m:.1f} ± {s:.1f}"
    if kind == "sci":
        return f"{m:.2e} ± {s:.1e}"
    return f"{m:.4f} ± {s:.4f}"


def row_order(rows: list[Row]) -> list[tuple[str, int]]:
    order = [*ABLATIONS, ANCHOR.key]
    seen = dict.fromkeys((r.key, r.bits) for r in rows)
    return sorted(seen, key=lambda kb: (-kb[1], order.index(kb[0])))


def collect(rows: list[Row], key: str, bits: int, metric: str) -> list[float]:
    return [r.figures.get(metric, math.nan) for r in rows if r.key == key and r.bits == bits]


def label_of(key: str) -> str:
    return ANCHOR.label if key == ANCHOR.key else ABLATIONS[key].label


def fidelity_table(rows: list[Row], bits: int) -> list[str]:
    verified = backends_to_verify()
    pair = f"pair_{LOGIT_BACKENDS[0]}_{LOGIT_BACKENDS[1]}"
    head = ["configuration", "n", "FP32 top-1 %", "ORT top-1 %", "OV top-1 %"]
    head += [f"{_short(b)} MSE" for b in verified] + [f"{_short(b)} SQNR dB" for b in verified]
    head += [f"{_short(b)} = FP32 top-1 %" for b in verified] + ["ORT = OV top-1 %", "parity SQNR dB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, b in row_order(rows):
        if b != bits:
            continue
        c = partial(collect, rows, key, b)
        cells = [label_of(key), str(len(c("top1_fp32"))), fmt(c("top1_fp32"), "pct"),
                 fmt(c("top1_onnxruntime"), "pct"), fmt(c("top1_openvino"), "pct")]
        cells += [fmt(c(f"mse_{v}"), "sci") for v in verified] + [fmt(c(f"sqnr_{v}"), "db") for v in verified]
        cells += [fmt(c(f"agree_{v}"), "pct") for v in verified]
        cells += [fmt(c(pair), "pct"), fmt(c("parity_sqnr"), "db")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def calibration_table(rows: list[Row], bits: int) -> list[str]:
    head = ["configuration", "Brier FP32", "Brier ORT", "Brier OV", "ECE FP32", "ECE ORT", "ECE OV"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, b in row_order(rows):
        if b != bits:
            continue
        c = partial(collect, rows, key, b)
        cells = [label_of(key)] + [fmt(c(f"{m}_{s}"), "f") for m in ("brier", "ece")
                                   for s in ("fp32", "onnxruntime", "openvino")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _short(backend: str) -> str:
    return {"onnxruntime": "ORT", "openvino": "OV", "qnn": "QNN"}.get(backend, backend)


def goals(rows: list[Row], qt_key: str = QUANT_TRIM) -> list[str]:
    """The issue's goals for Quant-Trim (QAT + RP 0.95, or the recipe's own), W8A8, from the seed means."""
    if not any(r.key == qt_key and r.bits == 8 for r in rows):
        return ["(Quant-Trim was not run: no goals checked)"]
    m = lambda key, metric: mean_sd(collect(rows, key, 8, metric))[0]  # noqa: E731
    out = []
    fp32 = m(FP32, "top1_fp32") if any(r.key == FP32 for r in rows) else m(qt_key, "top1_fp32")
    for b in LOGIT_BACKENDS:
        got = m(qt_key, f"top1_{b}")
        ok = got >= fp32 - 0.5
        out.append(f"- W8A8 top-1 within 0.5 points of FP32 ({fp32:.2f} %) on {_short(b)}: {got:.2f} % "
                   f"({got - fp32:+.2f}) -> {'met' if ok else 'NOT met'}")
    for ref, factor in ((PTQ, 0.5), (QAT_ONLY, 0.8)):
        if not any(r.key == ref for r in rows):
            continue
        for b in backends_to_verify():
            qt, other = m(qt_key, f"mse_{b}"), m(ref, f"mse_{b}")
            ratio = qt / other if other > 0 else math.inf
            out.append(f"- logit MSE <= {factor}x {label_of(ref)} on {_short(b)}: {qt:.3e} vs {other:.3e} = "
                       f"{ratio:.2f}x -> {'met' if ratio <= factor else 'NOT met'}")
    pair = m(qt_key, f"pair_{LOGIT_BACKENDS[0]}_{LOGIT_BACKENDS[1]}")
    out.append(f"- ORT vs OpenVINO top-1 agreement >= 99.5 %: {pair:.2f} % -> "
               f"{'met' if pair >= 99.5 else 'NOT met'}")
    return out


# --- plots ---------------------------------------------------------------------------------------


COLORS = {"fp32": "black", "rp": "tab:green", "qat": "tab:orange", "qt90": "tab:red", "qt95": "tab:purple",
          "qt99": "tab:blue", "qt97": "tab:brown"}
STYLES = {"fp32": "-", "rp": "-.", "qat": "--", "qt90": ":", "qt95": "-", "qt99": "-", "qt97": "-"}


def plot_curves(histories: dict[str, list[list]], recipe: Recipe, path: Path) -> None:
    """Fig. 8: validation accuracy (and loss) vs epoch, mean ± s.d. over seeds, λ_t on the top axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axl) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    for key, runs in histories.items():
        arr = np.array([[h[2] * 100 for h in run] for run in runs])
        loss = np.array([[h[3] for h in run] for run in runs])
        ep = np.arange(1, arr.shape[1] + 1)
        for a, v in ((ax, arr), (axl, loss)):
            mu, sd = v.mean(0), v.std(0)
            a.plot(ep, mu, STYLES[key], color=COLORS[key], label=ABLATIONS[key].label, lw=1.4)
            a.fill_between(ep, mu - sd, mu + sd, color=COLORS[key], alpha=0.15, lw=0)
    late = [np.mean([[h[2] * 100 for h in run] for run in runs], 0)[recipe.epochs // 4:]
            for runs in histories.values()]
    ax.set(xlabel="epoch", ylabel="validation top-1 (%) [torch, current λ]",
           ylim=(max(0.0, math.floor(min(float(v.min()) for v in late)) - 2.0), 100.5))
    axl.set(xlabel="epoch", ylabel="validation loss", yscale="log")
    curriculum = recipe.curriculum()
    ticks = sorted({recipe.warmup + 1, (recipe.warmup + recipe.ramp_end) // 2 + 1, recipe.ramp_end + 1,
                    recipe.ramp_end + recipe.horizon + 1, recipe.epochs})
    ticks = [t for t in ticks if 1 <= t <= recipe.epochs]
    for a in (ax, axl):
        a.grid(alpha=0.3)
        top = a.twiny()
        top.set_xlim(a.get_xlim())
        top.set_xticks(ticks)
        top.set_xticklabels([f"{curriculum(t - 1):.2f}" for t in ticks], fontsize=8)
        top.set_xlabel("λ_t during the epoch (QAT configurations)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_weights(weights: dict[str, list[np.ndarray]], path: Path) -> None:
    """Fig. 9: trained weight distributions per configuration (seed 0, W8 runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axr) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    for key, ws in weights.items():
        z = np.concatenate([(w / (w.std() + 1e-12)).ravel() for w in ws])
        hist, edges = np.histogram(z, bins=120, range=(-6, 6), density=True)
        ax.step(edges[:-1], np.maximum(hist, 1e-6), where="post", ls=STYLES[key], color=COLORS[key],
                label=ABLATIONS[key].label, lw=1.2)
        ratio = [float(np.abs(w).max() / (w.std() + 1e-12)) for w in ws]
        axr.plot(range(len(ratio)), ratio, STYLES[key], marker=".", color=COLORS[key], lw=1.2)
    ax.set(yscale="log", ylim=(1e-5, None), xlabel="weight / std of its layer (all conv + fc layers pooled)",
           ylabel="density")
    axr.set(xlabel="layer (conv1 ... fc)", ylabel="max|w| / std(w)  (scale inflation)")
    for a in (ax, axr):
        a.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------------


def build_report(rows: list[Row], recipe: Recipe, seeds: list[int], command: str,
                 seconds: tuple[float, float], plots: list[Path], data: Data) -> str:
    lines = [f"Command: `{command}`  ", f"Machine: {machine()}, load average {_load()} at the end  ",
             f"Run time (training, export and evaluation of every model): {seconds[0] / 60:.1f} min wall, "
             f"{seconds[1] / 60:.1f} min CPU time of the process (2 threads; the machine was shared, so "
             "the CPU time bounds the wall time on an idle 2-core machine)  ",
             f"Recipe: {recipe.describe()}  ",
             f"Data: scikit-learn digits (real 8x8 images upsampled to {recipe.image_size}x"
             f"{recipe.image_size}), one fixed split: {len(data.train)} train / {len(data.val)} val "
             f"(curves) / {len(data.test_y)} test (tables); seeds {seeds} (init and batch order); "
             "mean ± s.d. over seeds.", ""]
    for bits in (8, 4):
        if not any(r.bits == bits for r in rows):
            continue
        lines += [f"### W{bits}A8 (test split, each model against its own FP32 ONNX file)", "",
                  *fidelity_table(rows, bits), "", *calibration_table(rows, bits), ""]
    lines += [f"### Goals (Quant-Trim = {label_of(recipe.quant_trim)}, W8A8, seed means)", "",
              *goals(rows, recipe.quant_trim), ""]
    if FAILURES:
        lines += ["Backend failures (those cells read n/a):", "", *(f"- {f}" for f in dict.fromkeys(FAILURES)), ""]
    lines += ["Notes:", "",
              "- MSE, SQNR and '= FP32 top-1' compare each deployed model with its own float twin (the "
              "same trained weights run in FP32: its FP32 ONNX file on ONNX Runtime without optimizations), "
              "as the paper's Tables 1-2 do. A fake-quant-trained model is optimized to be accurate *when "
              "quantized*, not to track its float twin, so this MSE need not fall with QAT.",
              "- 'parity SQNR': the torch fake-quant model (λ = 1) against ONNX Runtime on the exported "
              "file, i.e. whether the export computes what was trained; n/a for the ORT anchor (no "
              "torch twin).",
              "- 'ORT = OV': share of test images on which ONNX Runtime and OpenVINO pick the same class, each "
              "running the file exported for its own target profile (target='onnxruntime' / 'openvino'; the "
              "ORT anchor's single file runs on both). FP32 top-1 of fake-quant rows is the float twin's.",
              "- qtrim's statistics take the 0.1 % / 99.9 % quantiles (paper defaults), so activations are "
              "clipped; ONNX Runtime's quantize_static uses MinMax (no clipping).",
              "- W4A8: 'FP32 + PTQ', 'RP only' and the ORT anchor are the same float models re-calibrated at "
              "4-bit weights; 'QAT + RP 0.95' is retrained with QuantConfig(weight_bits=4).",
              "- Test split: 450 images, so one image is 0.22 points of top-1.", ""]
    if plots:
        lines += ["Plots: " + ", ".join(f"[{p.name}](plots/{p.name})" for p in plots), ""]
    return "\n".join(lines)


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, fp32 and qt95, 3 epochs, width 4")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--configs", default=None, help=f"comma list of {','.join(ABLATIONS)}")
    ap.add_argument("--w4", default=None, help="configurations also exported W4A8 (fake-quant ones retrain)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--model", choices=("resnet18", "vit"), default="resnet18",
                    help="vit: a small ViT with the paper's transformer recipe (own section)")
    ap.add_argument("--act-quantiles", default=None, metavar="LO,HI",
                    help="observer quantile levels p_lo,p_hi (default 0.001,0.999); results go to their own section")
    ap.add_argument("--out", type=Path, default=PLOTS, help="folder of the PNG plots")
    ap.add_argument("--no-results", action="store_true", help="do not write benchmarks/RESULTS.md")
    ap.add_argument("--json", type=Path, default=None, help="also write every per-seed figure to this file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    # Denormal floats (tiny Adam moments and gradients) made float training up to 6x slower on x86;
    # flushing them to zero changes no figure that is reported here.
    torch.set_flush_denormal(True)
    try:
        return _main(parse_args(argv), argv)
    finally:  # main() also runs in process (tests): leave the process as it was
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, argv: list[str] | None) -> dict:
    recipe = QUICK if args.quick else FULL
    if args.model == "vit":
        recipe = Recipe(**{**VIT.__dict__, **({"width": 32, "epochs": 3, "calib_batches": 2} if args.quick else {})})
    if args.epochs or args.width:
        recipe = Recipe(**{**recipe.__dict__, **({"epochs": args.epochs} if args.epochs else {}),
                           **({"width": args.width} if args.width else {})})
    section, suffix = SECTION, ""
    if args.act_quantiles:
        try:
            p_lo, p_hi = (float(v) for v in args.act_quantiles.split(","))
        except ValueError:
            raise SystemExit(f"--act-quantiles takes LO,HI (e.g. 1e-5,0.99999), got {args.act_quantiles!r}") from None
        recipe = Recipe(**{**recipe.__dict__, "p_lo": p_lo, "p_hi": p_hi})
        section, suffix = f"{SECTION}, quantiles {p_lo:g} / {p_hi:g}", f"_q{p_hi:g}"
    if recipe.arch == "vit":
        section, suffix = section.replace(SECTION, f"{SECTION}, ViT (transformer recipe)"), suffix + "_vit"
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    qt = recipe.quant_trim
    default_keys = ("fp32,qat,qt97" if recipe.arch == "vit" else ",".join(k for k in ABLATIONS if k != "qt97"))
    keys = (args.configs or (f"fp32,{qt}" if args.quick else default_keys)).split(",")
    default_w4 = f"fp32,{qt}" if recipe.arch == "vit" else f"fp32,rp,{qt}"
    w4 = (args.w4 if args.w4 is not None else ("fp32" if args.quick else default_w4)).split(",")
    unknown = [k for k in [*keys, *w4] if k and k not in ABLATIONS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {', '.join(ABLATIONS)}")
    warnings.filterwarnings("ignore", module="torch.onnx")
    warnings.filterwarnings("ignore", message=".*TracerWarning.*")
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"paper ablation: {recipe.describe()}; seeds {seeds}; configs {keys}; W4A8 {w4}")
    start, cpu_start = time.perf_counter(), time.process_time()
    data = load_data(recipe.image_size)
    rows: list[Row] = []
    histories: dict[str, list] = {}
    weights: dict[str, list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="qtrim_ablation_") as tmp:
        for seed in seeds:
            r, h, w = run_seed(seed, recipe, keys, [k for k in w4 if k], data, Path(tmp), log)
            rows += r
            for k, v in h.items():
                histories.setdefault(k, []).append(v)
            if not weights:
                weights = w
    seconds = (time.perf_counter() - start, time.process_time() - cpu_start)
    args.out.mkdir(parents=True, exist_ok=True)
    plots = [args.out / f"paper_ablation_fig8_accuracy{suffix}.png", args.out / f"paper_ablation_fig9_weights{suffix}.png"]
    plot_curves(histories, recipe, plots[0])
    plot_weights(weights, plots[1])
    command = "python benchmarks/paper_ablation.py" + ("" if argv is None else " " + " ".join(argv))
    if argv is None:
        command = "python benchmarks/paper_ablation.py " + " ".join(sys.argv[1:])
    report = build_report(rows, recipe, seeds, command.strip(), seconds, plots, data)
    log("\n" + report)
    if args.json is not None:
        args.json.write_text(json.dumps({"recipe": recipe.__dict__, "seeds": seeds, "seconds": seconds,
                                         "rows": [r.__dict__ for r in rows], "histories": histories},
                                        indent=1, default=str))
    if not (args.quick or args.no_results):
        write_section(section, report)
        log(f"wrote the '## {section}' section of {RESULTS}")
    return {"rows": rows, "report": report, "seconds": seconds, "plots": plots}


if __name__ == "__main__":
    main()
