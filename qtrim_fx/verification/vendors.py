"""``qtrim_fx.vendor_sweep``: how much does low-bit accuracy depend on how a vendor tool quantizes?

Many NPU compilers ignore embedded QAT scales and recalibrate the float graph with their own
observers, clipping and granularity. This module emulates that with *independent* tools —
ONNX Runtime's ``quantize_static`` with MinMax / Percentile / Entropy calibration, per-tensor
or per-channel weights, uint8 asymmetric or int8 symmetric activations, small or large
calibration sets — applied to the checkpoint's FP32 graph (the prepared model at λ = 0), plus
our own embedded-scale QDQ export (one file per runtime, exported with that runtime's target profile),
and runs every variant on ONNX Runtime and OpenVINO (and, with ``backends=(..., "qnn")``, the QNN HTP
simulator of ``onnxruntime-qnn``, CPU fallback disabled: a file the HTP cannot run is an ``error`` row).

The report gives top-1 and logit MSE vs the FP32 model per variant and backend, and the spread
across variants (max − min top-1, std of logit MSE, the worst variant): a hardware-neutral
checkpoint has a small spread.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qtrim_fx.core.errors import ConfigError
from qtrim_fx.core.fileio import write_atomically, write_text_atomically
from qtrim_fx.core.profiles import profile_names

__all__ = ["DEFAULT_VARIANTS", "QUICK_VARIANTS", "VendorReport", "VendorRow", "VendorVariant", "vendor_sweep"]


@dataclass(frozen=True)
class VendorVariant:
    """One vendor-style quantization of the FP32 graph.

    Attributes:
        name: short label.
        tool: ``"ort"`` (ONNX Runtime ``quantize_static``) or ``"qtrim"`` (our embedded scales).
        method: ORT calibration: ``"minmax"``, ``"percentile"`` or ``"entropy"``.
        percentile: for ``"percentile"``, e.g. 99.99.
        per_channel: per-channel weights.
        activations: ``"u8"`` (uint8 asymmetric) or ``"s8"`` (int8 symmetric).
        calib_size: number of calibration samples the tool sees.
    """

    name: str
    tool: str = "ort"
    method: str = "minmax"
    percentile: float = 99.999
    per_channel: bool = True
    activations: str = "u8"
    calib_size: int = 256


QUICK_VARIANTS = (
    VendorVariant("qtrim-embedded", tool="qtrim"),
    VendorVariant("ort-minmax-pc-u8", method="minmax"),
    VendorVariant("ort-minmax-pt-s8-32", method="minmax", per_channel=False, activations="s8", calib_size=32),
)

DEFAULT_VARIANTS = (
    VendorVariant("qtrim-embedded", tool="qtrim"),
    VendorVariant("ort-minmax-pc-u8", method="minmax"),
    VendorVariant("ort-minmax-pt-u8", method="minmax", per_channel=False),
    VendorVariant("ort-minmax-pc-s8", method="minmax", activations="s8"),
    VendorVariant("ort-minmax-pc-u8-32", method="minmax", calib_size=32),
    VendorVariant("ort-pct99.99-pc-u8", method="percentile", percentile=99.99),
    VendorVariant("ort-pct99.999-pc-u8", method="percentile", percentile=99.999),
    VendorVariant("ort-pct99.99-pt-s8-32", method="percentile", percentile=99.99, per_channel=False,
                  activations="s8", calib_size=32),
    VendorVariant("ort-entropy-pc-u8", method="entropy"),
    VendorVariant("ort-entropy-pt-u8-32", method="entropy", per_channel=False, calib_size=32),
)


@dataclass
class VendorRow:
    variant: str
    backend: str
    status: str
    top1: float | None = None  # accuracy vs labels (or agreement with FP32 when no labels)
    logit_mse: float | None = None
    message: str = ""


@dataclass
class VendorReport:
    fp32_top1: float
    weight_bits: int
    rows: list[VendorRow] = field(default_factory=list)

    def ok_rows(self, backend: str | None = None) -> list[VendorRow]:
        return [r for r in self.rows if r.status == "ok" and (backend is None or r.backend == backend)]

    def spread(self, backend: str | None = None) -> dict[str, Any]:
        """max − min top-1, std of logit MSE and the worst variant over ``backend``'s (or all) rows."""
        rows = self.ok_rows(backend)
        if not rows:
            return {"top1_spread": None, "mse_std": None, "worst": None, "worst_top1": None}
        top = [r.top1 for r in rows]
        worst = min(rows, key=lambda r: r.top1)
        mses = [r.logit_mse for r in rows]
        return {
            "top1_spread": max(top) - min(top),
            "mse_std": statistics.pstdev(mses) if len(mses) > 1 else 0.0,
            "worst": f"{worst.variant} on {worst.backend}",
            "worst_top1": worst.top1,
            "worst_gap_to_fp32": self.fp32_top1 - worst.top1,
        }

    def to_dict(self) -> dict[str, Any]:
        backends = sorted({r.backend for r in self.rows})
        return {
            "fp32_top1": self.fp32_top1,
            "weight_bits": self.weight_bits,
            "rows": [asdict(r) for r in self.rows],
            "spread": {"all": self.spread(), **{b: self.spread(b) for b in backends}},
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            write_text_atomically(path, text)
        return text

    def table(self) -> str:
        lines = [f"FP32 top-1: {100 * self.fp32_top1:.2f}%   weights: {self.weight_bits} bit",
                 f"{'variant':28s} {'backend':12s} {'top-1 %':>8s} {'logit MSE':>11s}  status"]
        for r in self.rows:
            t = "-" if r.top1 is None else f"{100 * r.top1:.2f}"
            m = "-" if r.logit_mse is None else f"{r.logit_mse:.3e}"
            lines.append(f"{r.variant:28s} {r.backend:12s} {t:>8s} {m:>11s}  {r.status} {r.message}".rstrip())
        s = self.spread()
        if s["top1_spread"] is not None:
            lines.append(f"spread: top-1 {100 * s['top1_spread']:.2f} points, std(logit MSE) {s['mse_std']:.3e}, "
                         f"worst {s['worst']} ({100 * s['worst_top1']:.2f}%)")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        lines = ["| variant | backend | top-1 % | logit MSE | status |", "|---|---|---|---|---|"]
        for r in self.rows:
            t = "-" if r.top1 is None else f"{100 * r.top1:.2f}"
            m = "-" if r.logit_mse is None else f"{r.logit_mse:.3e}"
            lines.append(f"| {r.variant} | {r.backend} | {t} | {m} | {r.status} |")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> None:
        """PNG: top-1 per variant (rows) and backend (columns) as a heat map."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        variants = list(dict.fromkeys(r.variant for r in self.rows))
        backends = list(dict.fromkeys(r.backend for r in self.rows))
        grid = np.full((len(variants), len(backends)), np.nan)
        for r in self.ok_rows():
            grid[variants.index(r.variant), backends.index(r.backend)] = 100 * r.top1
        fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(backends), 0.9 + 0.42 * len(variants)))
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        for i in range(len(variants)):
            for j in range(len(backends)):
                if not math.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(backends)), backends)
        ax.set_yticks(range(len(variants)), variants, fontsize=8)
        ax.set_title(f"top-1 % by vendor-style quantization (FP32 {100 * self.fp32_top1:.1f}%)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        fmt = Path(path).suffix.lstrip(".") or "png"
        write_atomically(path, lambda f: fig.savefig(f, dpi=110, format=fmt))
        plt.close(fig)


class _Reader:
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self._items = iter([{name: b} for b in batches])

    def get_next(self) -> dict | None:
        return next(self._items, None)


def _as_batches(data: Any) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        return [data]
    return [d[0] if isinstance(d, (tuple, list)) else d for d in data]


def _ort_variant(fp32: Path, out: Path, v: VendorVariant, calib: list[np.ndarray], weight_bits: int) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if v.method not in methods:
        raise ValueError(f"unknown calibration method {v.method!r}; use minmax, percentile or entropy")
    samples = np.concatenate(calib)[: v.calib_size]
    batches = [samples[i:i + 32] for i in range(0, len(samples), 32)]
    act = QuantType.QUInt8 if v.activations == "u8" else QuantType.QInt8
    wtype = QuantType.QInt8 if weight_bits == 8 else QuantType.QInt4
    extra = {"ActivationSymmetric": v.activations == "s8", "CalibPercentile": v.percentile}
    import onnx

    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    quantize_static(str(fp32), str(out), _Reader(name, batches), quant_format=QuantFormat.QDQ,
                    per_channel=v.per_channel, activation_type=act, weight_type=wtype,
                    calibrate_method=methods[v.method], extra_options=extra)


def _run(path: Path, backend: str, batches: list[np.ndarray]) -> np.ndarray:
    if backend == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        return np.concatenate([s.run(None, {name: b})[0] for b in batches])
    if backend == "openvino":
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return np.concatenate([compiled(b)[0] for b in batches])
    if backend == "qnn":  # the QNN HTP simulator (onnxruntime-qnn), strict: no CPU fallback
        from qtrim_fx.verification.backend_worker import run_backend

        return np.concatenate([o[0] for o in run_backend("qnn", str(path), [[b] for b in batches]).outputs])
    raise ValueError(f"unknown backend {backend!r}; use onnxruntime, openvino or qnn")


def _float_graph(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """FP32 ONNX of the checkpoint's float graph (a prepared model runs at λ = 0)."""
    from qtrim_fx.onnx.dynamo_export import export_float
    from qtrim_fx.runtime.prepared import is_prepared

    saved = None
    if is_prepared(model):
        saved = float(model.qtrim_blend.value)
        model.qtrim_blend.set(0.0)
    was = model.training
    try:
        model.eval()
        if saved is None:
            export_float(model, (example,), str(path), ["x"], ["y"], opset=17)  # torch.export + onnxscript
        else:
            _float_graph_legacy(model, example, path)
    finally:
        model.train(was)
        if saved is not None:
            model.qtrim_blend.set(saved)


def _float_graph_legacy(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """A prepared model at λ = 0 through the TorchScript exporter: its trace drops the blend arithmetic
    (λ = 0 is a constant there), where ``torch.export`` keeps every site's fake-quant ops, multiplied by 0,
    in the graph a vendor tool would then quantize."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})


def vendor_sweep(
    model: nn.Module,
    calibration: Sequence[Any],
    evaluation: Sequence[Any],
    labels: torch.Tensor | None = None,
    variants: Sequence[VendorVariant] = DEFAULT_VARIANTS,
    backends: Sequence[str] = ("onnxruntime", "openvino"),
    weight_bits: int = 8,
    workdir: str | os.PathLike | None = None,
    progress: bool = False,
) -> VendorReport:
    """Quantize the checkpoint's float graph the way vendor tools do and measure the spread.

    Args:
        model: a prepared (trained or calibrated) model, or a plain float model (then the
            ``qtrim`` variant prepares and calibrates it on ``calibration``).
        calibration: input batches (tensors, or (inputs, labels) pairs) for the calibrating tools.
        evaluation: input batches, or (inputs, labels) pairs, to evaluate on.
        labels: labels of the concatenated evaluation inputs (taken from the pairs when given there);
            without labels, "top-1" is the agreement with the FP32 model's argmax.
        variants: the :class:`VendorVariant` matrix (default :data:`DEFAULT_VARIANTS`).
        backends: runtimes to run every variant on: "onnxruntime", "openvino", "qnn" (HTP simulator).
        weight_bits: 8, or 4 (ORT int4 weights; our export at opset 21).
        workdir: keep the ONNX files there (default: a temporary directory).
        progress: show a progress bar.

    Returns:
        :class:`VendorReport` (``table()``, ``spread()``, ``to_json()``, ``plot()``).

    Raises:
        ValueError: no calibration or no evaluation batch.
        ConfigError: (a ``ValueError``) batches whose shapes differ beyond the batch size (every variant would
            fail on them).
    """
    from tqdm.auto import tqdm

    import qtrim_fx

    calib = [b.detach().float() for b in _as_batches(calibration)]
    eval_x = [b.detach().float() for b in _as_batches(evaluation)]
    if not calib or not eval_x:
        raise ValueError("vendor_sweep needs non-empty calibration and evaluation batches")
    want = tuple(eval_x[0].shape[1:])
    for name, batches in (("calibration", calib), ("evaluation", eval_x)):
        bad = next(((i, tuple(b.shape)) for i, b in enumerate(batches) if tuple(b.shape[1:]) != want), None)
        if bad is not None:  # every variant would fail on it, each in its own words
            raise ConfigError(
                f"vendor_sweep: {name} batch {bad[0]} has shape {bad[1]} but the first evaluation batch is "
                f"{tuple(eval_x[0].shape)}: every batch must be one input of the model, (N, {', '.join(map(str, want))}) "
                "(pass inputs, or (inputs, labels) pairs)"
            )
    if labels is None and all(isinstance(d, (tuple, list)) and len(d) > 1 for d in evaluation):
        labels = torch.cat([d[1] for d in evaluation])
    with tempfile.TemporaryDirectory() as tmp_dir:
        work = Path(workdir) if workdir is not None else Path(tmp_dir)
        work.mkdir(parents=True, exist_ok=True)
        fp32 = work / "fp32.onnx"
        _float_graph(model, eval_x[0][:1], fp32)
        x_np = [b.numpy() for b in eval_x]
        ref = _run(fp32, "onnxruntime", x_np)
        target = labels.numpy() if labels is not None else ref.argmax(1)
        report = VendorReport(fp32_top1=float((ref.argmax(1) == target).mean()), weight_bits=weight_bits)
        for v in tqdm(variants, disable=not progress, desc="vendor variants", leave=False):
            path = work / f"{v.name}.onnx"
            paths = dict.fromkeys(backends, path)  # the file each backend runs
            try:
                if v.tool == "qtrim":
                    qm = model if qtrim_fx.is_prepared(model) else qtrim_fx.prepare(model)
                    if not qtrim_fx.is_prepared(model):
                        qtrim_fx.calibrate(qm, calib)
                    saved = float(qm.qtrim_blend.value)
                    qtrim_fx.set_blend(qm, 1.0)
                    try:
                        # One export per runtime with that runtime's target profile, as a user deploys it.
                        exported: set[str] = set()  # this call's files only: a reused workdir may hold old ones
                        for b in backends:
                            profile = b if b in profile_names() else "onnxruntime"
                            paths[b] = work / f"{v.name}.{profile}.onnx"
                            if profile not in exported:
                                exported.add(profile)
                                qtrim_fx.export_onnx(qm, (eval_x[0][:1],), paths[b], profile,
                                                     opset=21 if weight_bits == 4 else None)
                    finally:
                        qtrim_fx.set_blend(qm, saved)
                else:
                    _ort_variant(fp32, path, v, [b.numpy() for b in calib], weight_bits)
            except Exception as e:  # a tool that cannot make this variant: reported, not fatal
                report.rows += [VendorRow(v.name, b, "error", message=f"{type(e).__name__}: {e}"[:200])
                                for b in backends]
                continue
            for b in backends:
                try:
                    out = _run(paths[b], b, x_np)
                except Exception as e:
                    report.rows.append(VendorRow(v.name, b, "error", message=f"{type(e).__name__}: {e}"[:200]))
                    continue
                report.rows.append(VendorRow(v.name, b, "ok", float((out.argmax(1) == target).mean()),
                                             float(((out - ref) ** 2).mean())))
    return report
