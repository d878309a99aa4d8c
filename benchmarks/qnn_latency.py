"""QNN HTP (simulated on x86) latency: our `qnn` files vs ONNX Runtime's own QNN QDQ recipe, same model.

    python benchmarks/qnn_latency.py [--models tiny_convnet,cifar_resnet18,vit_tiny] [--runs 30] [--quick] [--no-write]

Per model (built-in factories, seeded random init, batch 1), four files:

* ``fp32``: ``torch.onnx.export`` of the float model (opset 17); the reference of every SQNR below;
* ``ort_qnn``: ORT's recipe on that file: ``qnn_preprocess_model`` + ``get_qnn_qdq_config`` (its defaults:
  uint8 activations and weights, MinMax calibration) + ``quantize``;
* ``ours_default``: ``qtrim_fx.prepare(model)`` (hardware-neutral sites) exported with ``target="qnn"``;
* ``ours_qnn``: ``qtrim_fx.prepare(model, target="qnn")`` exported with ``target="qnn"``.

Both quantizers calibrate on the same 8 seeded batches. Each file runs on the QNN HTP backend of
``onnxruntime-qnn`` (strict: CPU fallback disabled; the batch dimension pinned to 1), interleaved round by
round in a shuffled order; medians are quoted. "float ops" is ``qtrim_fx.onnx.check(path, "qnn")``'s
``float_op`` count (ops outside a complete DQ -> op -> Q group: the HTP runs them in FLOAT_32). SQNR is
quoted against the float model and, for our files, against the lowered torch model (the prepared model at
λ = 1 in eval, the acceptance reference of issue 20), on one seeded input. The
simulator's wall time is not the phone's, but FLOAT_32 islands cost there what they cost here (issue 20).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section
from qtrim_fx.models import get_model

import qtrim_fx

TITLE = "QNN HTP latency: qnn files vs ORT's QNN QDQ recipe (issue 20)"
NOTES = """Reading: `ours_qnn` is `prepare(model, target="qnn")`. vit_tiny's `qnn` file went from 2.7x to ~1.0x
ORT's recipe with two changes (issue 20, measured on the simulated HTP): (1) parameter operands of the ops the
profile runs on integers are trained sites: the position-embedding `Add` read a float initializer (the last
float op); it is now `DQ(uint8 codes)`, 0 float ops; (2) the `qnn` profile's `matmul_weights_per_tensor`:
QNN's detailed profile showed our weighted MatMuls (q/k/v/proj/fc1/fc2, Linear on 3-D input -> ONNX MatMul,
per-channel int8) at 8-10x the cycles of ORT's per-tensor ones; `prepare(target="qnn")` now trains those
weights per-tensor (a Linear on 2-D input, a Gemm, stays per-channel: a per-tensor int8 Gemm head measured
-6.7 dB on the HTP while ONNX Runtime CPU was fine). Per-tensor vs per-channel MatMul weights on vit_tiny,
same session, 16 seeded inputs: HTP 0.85x vs 2.0x ORT's latency, HTP SQNR vs the lowered torch model 20.9 vs
21.7 dB (ONNX Runtime CPU vs lowered: 27.3 vs 25.3 dB) - the granularity costs < 1 dB, so per-tensor.
vit_tiny's SQNR vs the lowered torch model is below the issue's 30 dB on the HTP for either granularity. The
floor is the simulated HTP itself, not our files: on the same 16 inputs, HTP vs ONNX Runtime CPU on the *same*
file is 21.4 dB for ours and 20.3 dB for ORT's own recipe file; per tensor (ours, one input, each DQ output made
a graph output) the HTP already differs at the input's Q -> DQ (42 dB: codes one LSB off) and is at 30-35 dB
within the first block (LayerNorm out 35, QK^T 30, block output 36), 32-33 dB in the second.
cifar_resnet18's SQNR says little: its random-init output changes ~4 % between inputs (the fc bias dominates),
so every file reads 52 dB vs fp32, and ours equals its lowered model's output to float rounding (~160 dB).
SQNR is one random input through randomly initialised models, not a fidelity claim."""


class _Reader:
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.items = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.items, None)


def _htp_session(path: Path) -> ort.InferenceSession:
    import onnxruntime_qnn

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if not any(d.ep_name == "QNNExecutionProvider" for d in ort.get_ep_devices()):
        ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    so.add_provider_for_devices(devices, {"backend_path": onnxruntime_qnn.get_qnn_htp_path()})
    so.add_free_dimension_override_by_name("batch", 1)
    return ort.InferenceSession(str(path), sess_options=so)


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((ref - out) ** 2), 1e-30)))


def _float_ops(path: Path) -> int:
    return sum(v.rule == "float_op" for v in qtrim_fx.onnx.check(path, "qnn"))


def _ours(name: str, calib: list, x: torch.Tensor, path: Path, target: str | None, test: torch.Tensor) -> np.ndarray:
    """Write the file; return the lowered torch model's output on ``test`` (the prepared model at λ=1, eval)."""
    model, _ = get_model(name, batch_size=1)
    qm = qtrim_fx.prepare(model, (x,), **({"target": target} if target else {}))
    qtrim_fx.calibrate(qm, [(b,) for b in calib])
    qtrim_fx.set_blend(qm, 1.0)
    qm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.export_onnx(qm, (x,), path, target="qnn")
    with torch.no_grad():
        return qm(test).numpy()


def _ort_recipe(fp32: Path, calib: list, out: Path, tmp: Path) -> None:
    from onnxruntime.quantization import quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    pre = tmp / "pre.onnx"
    src = pre if qnn_preprocess_model(str(fp32), str(pre)) else fp32
    config = get_qnn_qdq_config(str(src), _Reader("x", [b.numpy() for b in calib]))
    quantize(str(src), str(out), config)


def _files(name: str, tmp: Path) -> tuple[dict[str, Path], np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The files, the test input, the float model's output on it and each of our lowered models' output."""
    model, (x,) = get_model(name, batch_size=1)
    calib = [get_model(name, batch_size=1, seed=s)[1][0] for s in range(1, 9)]
    files = {k: tmp / f"{name}.{k}.onnx" for k in ("fp32", "ort_qnn", "ours_default", "ours_qnn")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(files["fp32"]), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"])
    _ort_recipe(files["fp32"], calib, files["ort_qnn"], tmp)
    test = get_model(name, batch_size=1, seed=99)[1][0]
    lowered = {k: _ours(name, calib, x, files[k], t, test) for k, t in (("ours_default", None), ("ours_qnn", "qnn"))}
    with torch.no_grad():
        ref = model(test).numpy()
    return files, test.numpy(), ref, lowered


def _bench(name: str, runs: int, tmp: Path) -> list[dict]:
    files, test, ref, lowered = _files(name, tmp)
    sessions, rows = {}, []
    for k in ("ort_qnn", "ours_default", "ours_qnn"):
        try:
            sessions[k] = _htp_session(files[k])
        except Exception as e:  # a file the HTP refuses is a result too
            rows.append({"model": name, "file": k, "error": " ".join(str(e).split())[:120]})
    feeds = {k: {s.get_inputs()[0].name: test} for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for k, s in sessions.items():
        s.run(None, feeds[k])  # warm-up
    order = list(sessions)
    for _ in range(runs):
        random.shuffle(order)
        for k in order:
            t = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(time.perf_counter() - t)
    for k, s in sessions.items():
        out = s.run(None, feeds[k])[0]
        rows.append({"model": name, "file": k, "ms": 1e3 * statistics.median(times[k]),
                     "float_ops": _float_ops(files[k]), "sqnr": _sqnr(ref, out),
                     "sqnr_lowered": _sqnr(lowered[k], out) if k in lowered else None})
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| model | file | HTP median ms | vs ORT recipe | float ops (check) | SQNR vs fp32 dB "
             "| SQNR vs lowered torch dB |", "|---|---|---|---|---|---|---|"]
    base = {r["model"]: r["ms"] for r in rows if r["file"] == "ort_qnn" and "ms" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['file']} | refused: {r['error']} | | | | |")
            continue
        rel = f"{r['ms'] / base[r['model']]:.2f}x" if r["model"] in base else "-"
        low = "-" if r["sqnr_lowered"] is None else f"{r['sqnr_lowered']:.1f}"
        lines.append(f"| {r['model']} | {r['file']} | {r['ms']:.2f} | {rel} | {r['float_ops']} | {r['sqnr']:.1f} | {low} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny_convnet,cifar_resnet18,vit_tiny")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="tiny_convnet, 3 runs, nothing written")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    models = ["tiny_convnet"] if args.quick else args.models.split(",")
    runs = 3 if args.quick else args.runs
    rows: list[dict] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            rows += _bench(name, runs, Path(tmp))
    table = _table(rows)
    load = f"1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    print(f"{table}\n{load}")
    if not (args.quick or args.no_write):
        import onnxruntime_qnn

        cmd = f"python benchmarks/qnn_latency.py --models {args.models} --runs {runs}"
        write_section(TITLE, f"`{cmd}` — {machine()}, onnxruntime {ort.__version__}, onnxruntime-qnn "
                      f"{onnxruntime_qnn.__version__} (HTP backend simulated on x86, strict, batch 1), medians of "
                      f"{runs} interleaved runs; {load} (other jobs share the machine: the interleaving keeps the ratios fair, not the absolute ms).\n\n{table}\n\n{NOTES}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
