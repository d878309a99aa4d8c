"""ONNX Runtime latency: our `onnxruntime`-target export vs ORT's own quantize_static vs FP32.

    python benchmarks/ort_latency.py [--model resnet18] [--size 224] [--runs 50] [--threads 2] [--no-write]

All three files come from the same torchvision network (random init, BatchNorm statistics
warmed on random data); they run on the CPU execution provider with full graph optimizations,
interleaved round by round in a shuffled order, batch 1. Medians are quoted. ORT's model: QDQ format,
per-channel int8 weights, uint8 activations (its recommended CPU setting).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section

import qtrim_fx


class _Reader:
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.items = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.items, None)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _kernels(sess_path: Path, threads: int, out: Path) -> dict[str, int]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.optimized_model_filepath = str(out)
    so.log_severity_level = 3
    ort.InferenceSession(str(sess_path), so, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for n in onnx.load(out).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def build(model_name: str, size: int, tmp: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, size, size, generator=gen) for _ in range(4)]
    with torch.no_grad():  # give BatchNorm realistic running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        model.train()
        for b in calib:
            model(b)
    model.eval()
    x = torch.randn(1, 3, size, size, generator=gen)
    paths = {"fp32": tmp / "fp32.onnx", "ort_quantize_static": tmp / "ort_qdq.onnx", "qtrim_fx": tmp / "ours.onnx"}
    torch.onnx.export(model, (x,), paths["fp32"], dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    quantize_static(str(paths["fp32"]), str(paths["ort_quantize_static"]),
                    _Reader("x", [b.numpy() for b in calib]), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, calib)
    qtrim_fx.set_blend(qm, 1.0)
    qtrim_fx.export_onnx(qm.eval(), (x,), paths["qtrim_fx"], target="onnxruntime", input_names=["x"])
    return paths


def measure(paths: dict[str, Path], size: int, runs: int, threads: int) -> dict[str, float]:
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():  # warm-up
        for _ in range(5):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    rng = np.random.default_rng(0)
    for _ in range(runs):
        rng.shuffle(order)  # no model always runs right after the (slow, cache-flushing) FP32 one
        for k in order:
            s = sessions[k]
            t = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = build(args.model, args.size, tmp)
        ms = measure(paths, args.size, args.runs, args.threads)
        kernels = {k: _kernels(p, args.threads, tmp / f"{k}.opt.onnx") for k, p in paths.items() if k != "fp32"}
    rows = [
        "| model file | median latency (ms) | vs FP32 | vs ORT quantize_static |",
        "|---|---|---|---|",
    ]
    for k, v in ms.items():
        rows.append(f"| {k} | {v:.2f} | {ms['fp32'] / v:.2f}x faster | {v / ms['ort_quantize_static']:.3f}x |")
    integer = {k: {op: n for op, n in ops.items() if op.startswith(("QLinear", "QGemm", "ConvInteger",
                                                                      "MatMulInteger"))}
               for k, ops in kernels.items()}
    float_ops = {k: {op: n for op, n in ops.items() if op in ("Conv", "Gemm", "MatMul")} for k, ops in kernels.items()}
    table = "\n".join(rows)
    text = (f"{table}\n\nInteger kernels after ORT optimization: {integer}\n"
            f"Float Conv/Gemm/MatMul left: {float_ops}")
    print(text)
    ratio = ms["qtrim_fx"] / ms["ort_quantize_static"]
    print(f"\nours / ORT quantize_static = {ratio:.3f} (goal <= 1.05)")
    if not args.no_write:
        cmd = "python benchmarks/ort_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(
            "ONNX Runtime latency (issue: export)",
            f"Command: `{cmd.strip()}`  \nMachine: {machine()}, onnxruntime {ort.__version__}  \n"
            f"{args.model} {args.size}x{args.size}, batch 1, {args.threads} intra-op threads, CPU EP, "
            f"ORT_ENABLE_ALL, {args.runs} interleaved rounds, medians. Goal: ours <= 1.05x ORT's own "
            f"quantize_static QDQ model: {ratio:.3f}x, {'met' if ratio <= 1.05 else 'NOT met'}.\n\n{text}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
