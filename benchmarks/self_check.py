"""Export self-check: its cost, and where a correct file and a corrupted one sit against its threshold.

    python benchmarks/self_check.py [--models tv_resnet18:tensorrt,cifar_resnet18:onnxruntime] [--no-write]

Per model and target: export time without the check (``verify=False``) and with it (median of
``--repeat``); then ONNX Runtime (no graph optimizations) vs the lowered model: the error RMS, the
model's own noise floor (the lowered model rerun with every quantizer input moved by 1e-6 and 1e-5,
see ``qtrim_fx.onnx.self_check``), and the same after one activation DequantizeLinear is given 1.5x
its scale. A correct file sits near 1x the floor; the check refuses above ``NOISE_FACTOR`` (4x).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section
from qtrim_fx.models import get_model

import qtrim_fx
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.onnx.self_check import NOISE_FACTOR, _jittered
from qtrim_fx.passes.lower.api import lower

DEFAULT = "tiny_convnet:onnxruntime,cifar_resnet18:onnxruntime,cifar_resnet18:tensorrt,tv_resnet18:tensorrt"


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(a, np.float64) ** 2)))


def _corrupt(path: str) -> None:
    m = onnx.load(path)
    producer = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name: t for t in m.graph.initializer}
    for node in m.graph.node:
        src = producer.get(node.input[0])
        if node.op_type == "DequantizeLinear" and src is not None and src.op_type == "QuantizeLinear":
            scale = numpy_helper.to_array(inits[node.input[1]])
            new = numpy_helper.from_array((scale * 1.5).astype(scale.dtype), node.input[1] + "_x15")
            m.graph.initializer.append(new)
            node.input[1] = new.name
            onnx.save(m, path)
            return


def _ort_error(path: str, x: torch.Tensor, ref: np.ndarray) -> float:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return _rms(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0] - ref)


def _row(name: str, target: str, repeat: int) -> str:
    model, (x,) = get_model(name)
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "m.onnx")
        plain, checked = [], []
        for _ in range(repeat):
            t = time.perf_counter()
            qtrim_fx.export_onnx(qm, (x,), path, target=target, verify=False)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            qtrim_fx.export_onnx(qm, (x,), path, target=target)
            checked.append(time.perf_counter() - t)
        gm = lower(qm, get_profile(target)).eval()
        with torch.no_grad():
            ref = gm(x).numpy()
        floor = max(_rms(run[0] - ref) for run in _jittered(gm, (x,)))
        err = _ort_error(path, x, ref)
        _corrupt(path)
        bad = _ort_error(path, x, ref)
    p, c = float(np.median(plain)), float(np.median(checked))
    return (f"| {name} | {target} | {p:.2f} | {c:.2f} | {100 * (c - p) / p:+.0f}% | {_rms(ref):.3g} | {floor:.3g} "
            f"| {err:.3g} ({_times(err, floor)}) | {bad:.3g} ({_times(bad, floor)}) |")


def _times(e: float, floor: float) -> str:
    return f"{e / floor:.2f}x" if floor > 0 else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT, help="name:target pairs, comma separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    head = ("| model | target | export s (verify=False) | export s (verify=True) | check cost | output RMS "
            "| noise floor RMS | ORT err RMS (x floor) | 1.5x-scale DQ err RMS (x floor) |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = [_row(*pair.split(":"), args.repeat) for pair in args.models.split(",")]
    table = "\n".join([head, *rows])
    print(table)
    if not args.no_write:
        write_section("Export self-check", (
            f"`python benchmarks/self_check.py --models {args.models} --repeat {args.repeat}` on {machine()}; "
            f"medians of {args.repeat}. The check refuses a file above {NOISE_FACTOR:g}x its model's noise floor "
            f"(and beyond one-flip units).\n\n{table}"))


if __name__ == "__main__":
    main()
