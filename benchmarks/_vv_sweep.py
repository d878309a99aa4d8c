"""One checkpoint's recipe files, made once, run on every runtime (the vendor-variance tasks' sweep).

``qtrim_fx.vendor_sweep`` per call exports the float graph, lets ORT ``quantize_static`` calibrate each recipe
afresh, and runs each file; the tasks called it twice per checkpoint (ORT + OpenVINO, then the HTP
simulator), so the HTP recipes were quantized twice. Here, per checkpoint (same rows, same files):

- one float export; its ONNX Runtime logits are the reference of every row (as in ``vendor_sweep``);
- ORT calibration once per (method, activation type, calibration size, percentile), through
  ``quantize_static``'s own ``calibration_cache_path``: the per-tensor and per-channel recipes of one
  calibration share the activation ranges (weight ranges are never calibrated; the files are byte-identical
  to uncached ones, checked on MobileNetV2, RESULTS.md);
- a recipe whose file is byte-identical to an earlier recipe's is not run again: its rows are the earlier
  ones, and ``same_as`` names the pair (ORT's Entropy gives MinMax's files on these nets);
- the HTP simulator runs the files made for ORT / OpenVINO (our export: its ``qnn`` target profile file).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import qtrim_fx
from qtrim_fx.verification.vendors import VendorVariant, _float_graph, _Reader, _run


@dataclass
class FileRows:
    """(recipe, runtime, status, top-1 or agreement in [0, 1], logit MSE, message) rows of one checkpoint."""

    float_top1: float
    rows: list[tuple[str, str, str, float | None, float | None, str]] = field(default_factory=list)
    same_as: dict[str, str] = field(default_factory=dict)  # recipe -> earlier recipe with the same bytes


def _ort_file(fp32: Path, out: Path, v: VendorVariant, calib: list[np.ndarray], cache_dir: Path) -> None:
    """``vendor_sweep``'s ORT recipe (``qtrim_fx.verification.vendors._ort_variant``) with a calibration cache."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    samples = np.concatenate(calib)[: v.calib_size]
    batches = [samples[i:i + 32] for i in range(0, len(samples), 32)]
    act = QuantType.QUInt8 if v.activations == "u8" else QuantType.QInt8
    extra = {"ActivationSymmetric": v.activations == "s8", "CalibPercentile": v.percentile}
    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    cache = cache_dir / f"calib-{v.method}-{v.activations}-{v.calib_size}-{v.percentile:g}.json"
    quantize_static(str(fp32), str(out), _Reader(name, batches), quant_format=QuantFormat.QDQ,
                    per_channel=v.per_channel, activation_type=act, weight_type=QuantType.QInt8,
                    calibrate_method=methods[v.method], extra_options=extra, calibration_cache_path=str(cache))


def make_files(model: torch.nn.Module, calib: list[torch.Tensor], example: torch.Tensor,
               variants: tuple[VendorVariant, ...], work: Path, profiles: tuple[str, ...]
               ) -> tuple[Path, dict[str, dict[str, Path] | str]]:
    """The float graph and, per recipe, {runtime profile: file} or an error message. ``model`` is prepared."""
    fp32 = work / "fp32.onnx"
    _float_graph(model, example[:1], fp32)
    c = [b.numpy() for b in calib]
    files: dict[str, dict[str, Path] | str] = {}
    for v in variants:
        try:
            if v.tool == "qtrim":
                saved = float(model.qtrim_blend.value)
                qtrim_fx.set_blend(model, 1.0)
                try:  # one export per runtime with that runtime's target profile, as a user deploys it
                    files[v.name] = {}
                    for p in profiles:
                        files[v.name][p] = work / f"{v.name}.{p}.onnx"
                        qtrim_fx.export_onnx(model, (example[:1],), files[v.name][p], p)
                finally:
                    qtrim_fx.set_blend(model, saved)
            else:
                _ort_file(fp32, work / f"{v.name}.onnx", v, c, work)
                files[v.name] = dict.fromkeys(profiles, work / f"{v.name}.onnx")
        except Exception as e:  # a tool that cannot make this recipe: reported, not fatal
            files[v.name] = f"{type(e).__name__}: {e}"[:200]
    return fp32, files


def run_files(fp32: Path, files: dict[str, dict[str, Path] | str], names: tuple[str, ...], x: list[torch.Tensor],
              target: torch.Tensor | None, runtimes: tuple[str, ...]) -> FileRows:
    """Every ``names`` recipe on every runtime over ``x``; a file byte-identical to an earlier one is run once."""
    x_np = [b.numpy() for b in x]
    ref = _run(fp32, "onnxruntime", x_np)
    y = target.numpy() if target is not None else ref.argmax(1)
    out = FileRows(float((ref.argmax(1) == y).mean()))
    done: dict[tuple[str, str], tuple[str, list]] = {}  # (runtime, sha1) -> (recipe, its rows)
    for name in names:
        f = files[name]
        for rt in runtimes:
            if isinstance(f, str):
                out.rows.append((name, rt, "error", None, None, f))
                continue
            key = (rt, hashlib.sha1(f[rt].read_bytes()).hexdigest())
            if key in done:
                first, rows = done[key]
                out.same_as[name] = first
                out.rows += [(name, *r[1:]) for r in rows]
                continue
            try:
                logits = _run(f[rt], rt, x_np)
                row = (name, rt, "ok", float((logits.argmax(1) == y).mean()), float(((logits - ref) ** 2).mean()), "")
            except Exception as e:
                row = (name, rt, "error", None, None, f"{type(e).__name__}: {e}"[:200])
            done[key] = (name, [row])
            out.rows.append(row)
    return out
