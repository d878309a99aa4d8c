"""Model zoo: does every public architecture go through the whole pipeline, or fail with a qtrim error?

    python benchmarks/zoo.py [--quick] [--only name,...] [--targets onnxruntime,...] [--timeout 600]
                             [--all-torchvision] [--no-write]

One row per architecture (benchmarks/zoo_models.py: torchvision, timm, Hugging Face tiny configs,
random init), each in its own subprocess with a timeout, so a crash or a hang costs one row:

1. ``prepare`` (eval mode; keyword inputs for Hugging Face models);
2. λ = 0 exact: the prepared model's output equals the float model's bit for bit (eval);
3. train: SGD steps in train mode through the curriculum (λ = 0 → 1), no NaN/Inf loss;
4. ``calibrate`` on 2 batches;
5. ``export_onnx`` for every built-in target, ``check`` of the file against its own target;
6. parity: ONNX Runtime without graph optimizations (ORT_DISABLE_ALL) on the file vs the lowered
   GraphModule (``qtrim_fx.lower``) on the same inputs: SQNR (dB) and the share of outputs off by
   more than one output LSB (the scale of the output's DequantizeLinear; the float output's range
   / 255 where the output is not quantized);
7. weight coverage: share of parameter-holding ONNX ops (Conv, ConvTranspose, Gemm, MatMul, Gather,
   Einsum reading an initializer) whose weight comes through a DequantizeLinear;
8. Hugging Face rows: whether the ONNX Runtime file runs at another batch size (1 and 3).

Parity verdict per file, by export's own self-check (``qtrim_fx.onnx.self_check.verify_export``
on a copy of the file): ``=`` agrees, ``MISMATCH`` refused. For scale, the SQNR of the file and of
the float32 lowered graph against the same lowered graph run in float64 (rounding-boundary noise:
float32 vs float64 of one graph flips codes at ties as ORT vs torch does) is kept in the JSON.

Status: ``ok``; ``QtrimError`` (a qtrim error names the cause: an accepted outcome, listed);
``CRASH`` (any other exception: a bug); ``MISMATCH`` (λ = 0 not exact, or a file whose outputs
disagree with the lowered model beyond rounding — export's self-check refuses these at default
settings; the zoo exports with ``verify=False`` to measure them); ``NaN``; ``TIMEOUT``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section
from zoo_models import QUICK, all_models

TARGETS = ("onnxruntime", "tensorrt", "qnn", "openvino", "npu")
WEIGHT_OPS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1), "Gather": (0,), "Einsum": (0, 1)}
PASS_THROUGH = {"Transpose", "Reshape", "Cast", "Identity", "Unsqueeze", "Squeeze", "Flatten"}


# -- worker (one model, one process) ----------------------------------------------------------
def _leaves(out):
    import torch

    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _step(row: dict, name: str, fn):
    """Run one stage; record a qtrim error or a crash under ``name`` and return None on failure."""
    from qtrim_fx.core.errors import QtrimError

    t0 = time.perf_counter()
    try:
        return fn()
    except QtrimError as e:
        row.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    except Exception as e:
        row.setdefault("crashes", {})[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    finally:
        row.setdefault("stage_s", {})[name] = round(time.perf_counter() - t0, 2)
    return None


def _exact(model, qm, inputs) -> dict:
    import torch

    model.eval()
    qm.eval()
    with torch.enable_grad():  # nn.MultiheadAttention's no-grad fast path rounds differently
        ref, out = _leaves(_call(model, inputs)), _leaves(_call(qm, inputs))
    diff = max(((r - o).abs().max().item() for r, o in zip(ref, out, strict=True)), default=0.0)
    return {"exact": all(torch.equal(r, o) for r, o in zip(ref, out, strict=True)), "exact_diff": diff}


def _train(qm, make_inputs) -> dict:
    """One SGD step per curriculum epoch 0..3: λ = 0, 0.03, 0.5, 1 (train mode, reverse pruning on)."""
    import torch

    import qtrim_fx

    trim = qtrim_fx.QuantTrim(qm, qtrim_fx.Curriculum(warmup=0, ramp_end=2, horizon=1), qtrim_fx.ReversePruner(every=1))
    opt = torch.optim.SGD([p for p in qm.parameters() if p.requires_grad], lr=1e-3)
    qm.train()
    lams, losses = [], []
    for epoch in range(4):
        lams.append(round(trim.epoch_start(epoch), 3))
        loss = sum(t.float().pow(2).mean() for t in _leaves(_call(qm, make_inputs(2))))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    return {"lambdas": lams, "train_finite": all(torch.isfinite(torch.tensor(losses)).tolist())}


def _feeds(session, qm, inputs) -> dict:
    import numpy as np

    if isinstance(inputs, dict):
        named = dict(inputs)
    else:
        names = [n.name for n in qm.graph.nodes if n.op == "placeholder"]
        named = dict(zip(names, inputs, strict=False))
    return {i.name: np.asarray(named[i.name].numpy()) for i in session.get_inputs()}


def _ort_optimize() -> bool:
    """--ort-optimize: parity measured on ONNX Runtime's default optimizations (fused integer kernels)."""
    return os.environ.get("QTRIM_ZOO_ORT_OPTIMIZE") == "1"


def _session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if _ort_optimize()
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _output_lsbs(model) -> list[float | None]:
    """Per graph output: the scale of the DequantizeLinear producing it (None: not quantized)."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    producer = {o: n for n in model.graph.node for o in n.output}
    lsbs: list[float | None] = []
    for out in model.graph.output:
        node = producer.get(out.name)
        scale = None
        if node is not None and node.op_type == "DequantizeLinear":
            s = inits.get(node.input[1], consts.get(node.input[1]))
            scale = float(abs(s).max()) if s is not None else None
        lsbs.append(scale)
    return lsbs


def _positional(qm, inputs) -> tuple:
    if not isinstance(inputs, dict):
        return tuple(inputs)
    places = [n for n in qm.graph.nodes if n.op == "placeholder"]
    last = max(i for i, n in enumerate(places) if n.name in inputs)
    return tuple(inputs.get(n.name, n.args[0] if n.args else None) for n in places[: last + 1])


def _parity(qm, target: str, path: str, model, inputs) -> dict:
    """ORT (no optimizations) on the file vs the lowered GraphModule; verdict by export's own self-check."""
    import shutil

    import numpy as np
    import torch

    import qtrim_fx
    from qtrim_fx.core.errors import ExportError
    from qtrim_fx.onnx.self_check import verify_export

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    lowered = qtrim_fx.lower(qm, target, opset=opset)  # the opset export chose (INT4: 21)
    with torch.no_grad():
        ref = [t.numpy() for t in _leaves(_call(lowered, inputs))]
    sess = _session(path)
    got = sess.run(None, _feeds(sess, qm, inputs))
    if len(got) != len(ref):
        return {"parity_error": f"{len(got)} file outputs vs {len(ref)} lowered"}
    units = _output_lsbs(model)
    sqnrs, off, total = [], 0.0, 0
    for r, g, unit in zip(ref, got, units, strict=False):
        r64, g64 = r.astype(np.float64), np.asarray(g, dtype=np.float64)
        if r64.shape != g64.shape:
            return {"parity_error": f"output shape {g64.shape} != lowered {r64.shape}"}
        sqnrs.append(_sqnr(g64, r64))
        unit = unit or 0.01 * float(np.sqrt((r64 ** 2).mean()))
        off += float((np.abs(r64 - g64) > unit * 1.001).sum())
        total += r64.size
    res = {"sqnr_db": min(sqnrs), "off_lsb_share": off / max(total, 1), "verdict": "="}
    copy = path + ".check.onnx"
    shutil.copyfile(path, copy)
    try:
        verify_export(lowered, _positional(qm, inputs), copy, optimize=_ort_optimize())
    except ExportError as e:
        res["verdict"], res["disagree"] = "MISMATCH", str(e).splitlines()[1:3]
    ref64 = _float64_reference(lowered, inputs)
    if ref64 is not None:  # the same graph in float64: float32's own rounding noise, for scale
        res["sqnr_f32_vs_f64_db"] = min(_sqnr(r, q) for r, q in zip(ref, ref64, strict=True))
        res["sqnr_file_vs_f64_db"] = min(_sqnr(np.asarray(g), q) for g, q in zip(got, ref64, strict=True))
    return res


def _sqnr(a, ref) -> float:
    import numpy as np

    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    err = float(((a - ref) ** 2).sum())
    return 999.0 if err == 0 else float(10 * np.log10(float((ref ** 2).sum()) / err))


def _float64_reference(lowered, inputs):
    """The lowered graph run in float64 (None when the model cannot run in float64)."""
    import copy

    import torch

    try:
        g64 = copy.deepcopy(lowered).double()
        def cast(t):
            return t.double() if t.is_floating_point() else t

        x64 = {k: cast(v) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(map(cast, inputs))
        with torch.no_grad():
            return [t.numpy() for t in _leaves(_call(g64, x64))]
    except Exception:
        return None


def _coverage(model) -> dict:
    """Parameter-holding ops in the file, and how many read their weight through DequantizeLinear."""
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def source(name: str, depth: int = 0) -> str | None:  # "q" (through DQ of a constant), "f" (float), None
        if name in inits:
            return "f"
        node = producer.get(name)
        if node is None or depth > 6:
            return None
        if node.op_type == "Constant":
            return "f"
        if node.op_type == "DequantizeLinear":
            return "q" if source(node.input[0], depth + 1) else None
        if node.op_type in PASS_THROUGH and node.input:
            return source(node.input[0], depth + 1)
        return None

    held = quantized = 0
    floats: list[str] = []
    for node in model.graph.node:
        idx = WEIGHT_OPS.get(node.op_type)
        if idx is None:
            continue
        kinds = [source(node.input[i]) for i in idx if i < len(node.input)]
        if not any(kinds):
            continue
        held += 1
        if "q" in kinds:
            quantized += 1
        else:
            floats.append(f"{node.op_type}:{node.name}")
    return {"param_ops": held, "param_ops_quantized": quantized, "float_ops": floats[:5]}


def _other_batches(qm, path: str, make_inputs) -> dict:
    """Whether the file runs at batch 1 and 3 (the export used batch 2)."""
    result = {}
    sess = _session(path)
    for batch in (1, 3):
        try:
            sess.run(None, _feeds(sess, qm, make_inputs(batch)))
            result[str(batch)] = "ok"
        except Exception as e:
            result[str(batch)] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return result


def _export_target(row: dict, qm, inputs, make_inputs, target: str, folder: str, hf: bool, exporter: str) -> None:
    import qtrim_fx

    path = os.path.join(folder, f"{target}.onnx")
    t0 = time.perf_counter()
    # verify=False: parity is measured below with the self-check's own rule, so the row shows figures
    model = _step(row, f"export:{target}", lambda: qtrim_fx.export_onnx(qm, inputs, path, target=target, verify=False,
                                                                    **({"exporter": exporter} if exporter else {})))
    res: dict = {"export_s": round(time.perf_counter() - t0, 2), "exported": model is not None}
    if model is not None:
        violations = _step(row, f"check:{target}", lambda: qtrim_fx.check(path, target)) or []
        res["check_errors"] = sum(v.severity == "error" for v in violations)
        res["check_warnings"] = sum(v.severity != "error" for v in violations)
        res.update(_step(row, f"parity:{target}", lambda: _parity(qm, target, path, model, inputs)) or {})
        if target == "onnxruntime":
            row.update(_coverage(model))
            if hf:
                row["other_batches"] = _step(row, "batches", lambda: _other_batches(qm, path, make_inputs))
    row.setdefault("targets", {})[target] = res


def _for_target(row: dict, qm, model, inputs, make_inputs, target: str):
    """The prepared model to export for ``target``: ``qm`` itself, or, for an integer-only profile (one with
    ``activation_sites``: qnn, npu), ``prepare(model, target=target)`` of the trained float model (its
    parameters are the ones ``qm`` trained) calibrated on the same batches, so ``check`` of its own target
    judges the file a user of that target gets (README: "prepare(..., target=...)")."""
    import qtrim_fx
    from qtrim_fx.core.profiles import get_profile

    if not get_profile(target).activation_sites:
        return qm
    tq = _step(row, f"prepare:{target}", lambda: qtrim_fx.prepare(model, inputs, target=target))
    if tq is None or _step(row, f"calibrate:{target}",
                           lambda: qtrim_fx.calibrate(tq, [make_inputs(2), make_inputs(2)])) is None:
        return None
    qtrim_fx.set_blend(tq, 1.0)
    return tq.eval()


def run_one(name: str, targets: tuple[str, ...], all_torchvision: bool, exporter: str = "") -> dict:
    """Every stage for one architecture; failures are recorded in the row, never raised."""
    import warnings

    import torch

    import qtrim_fx

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    row: dict = {"name": name}
    t0 = time.perf_counter()
    built = _step(row, "build", all_models(all_torchvision)[name])
    if built is None:
        return row
    model, make_inputs = built
    model.eval()
    inputs = make_inputs(2)
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    qm = _step(row, "prepare", lambda: qtrim_fx.prepare(model, inputs))
    if qm is None:
        return row
    row["frontend"] = qm.qtrim_info.frontend
    row["leaves"] = len(qm.qtrim_info.fallbacks)
    row.update(_step(row, "exact", lambda: _exact(model, qm, inputs)) or {})
    row.update(_step(row, "train", lambda: _train(qm, make_inputs)) or {})
    calibrated = _step(row, "calibrate", lambda: qtrim_fx.calibrate(qm, [make_inputs(2), make_inputs(2)]))
    if calibrated is None:
        return row
    qm.eval()
    with tempfile.TemporaryDirectory() as folder:
        for target in targets:
            tq = _for_target(row, qm, model, inputs, make_inputs, target)
            if tq is not None:
                _export_target(row, tq, inputs, make_inputs, target, folder, name.startswith("hf_"), exporter)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def status(row: dict) -> str:
    """One word for the row (worst first): TIMEOUT, CRASH, MISMATCH, NaN, QtrimError, check, ok.

    ``check``: every stage ran, but ``check`` of some target's own file reports errors (named in the file's
    violations: e.g. ops a model's modules keep in float on an integer-only target)."""
    if row.get("not_run"):
        return "not run"
    if row.get("timeout"):
        return "TIMEOUT"
    if row.get("crashes") or row.get("returncode"):
        return "CRASH"
    parity = [t for t in row.get("targets", {}).values() if t.get("off_lsb_share") is not None]
    if any(t.get("verdict") == "MISMATCH" for t in parity) or row.get("exact") is False:
        return "MISMATCH"
    if row.get("train_finite") is False:
        return "NaN"
    if row.get("errors"):
        return "QtrimError"
    if any(t.get("check_errors") for t in row.get("targets", {}).values()):
        return "check"
    return "ok"


# -- driver ------------------------------------------------------------------------------------
def _spawn(name: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--worker", name, "--out", out, "--targets", ",".join(args.targets)]
    if args.all_torchvision:
        cmd.append("--all-torchvision")
    if args.exporter:
        cmd += ["--exporter", args.exporter]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=args.timeout, capture_output=True, text=True, env=env)
        row = json.loads(Path(out).read_text()) if Path(out).stat().st_size else {"name": name}
        if proc.returncode:
            row["returncode"] = proc.returncode
            row.setdefault("crashes", {})["process"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    except subprocess.TimeoutExpired:
        row = {"name": name, "timeout": True}
    finally:
        Path(out).unlink(missing_ok=True)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def _fmt_row(row: dict, targets: tuple[str, ...]) -> str:
    ts = row.get("targets", {})
    exported = sum(t.get("exported", False) for t in ts.values())
    checks = sum(t.get("check_errors", 0) for t in ts.values())
    parity = [t for t in ts.values() if t.get("sqnr_db") is not None]
    sqnr = f"{min(t['sqnr_db'] for t in parity):.1f}" if parity else "-"
    share = f"{100 * max(t['off_lsb_share'] for t in parity):.2f}" if parity else "-"
    verdicts = sorted({t.get("verdict", "-") for t in parity}, key="=MISMATCH".find)
    verdict = verdicts[-1] if verdicts else "-"
    cover = f"{row['param_ops_quantized']}/{row['param_ops']}" if "param_ops" in row else "-"
    batches = row.get("other_batches")
    other = "-" if not batches else ("ok" if all(v == "ok" for v in batches.values()) else "fails")
    exact = {True: "yes", False: f"NO ({row.get('exact_diff', 0):.1e})"}.get(row.get("exact"), "-")
    train = {True: "ok", False: "NaN"}.get(row.get("train_finite"), "-")
    notes = "; ".join(f"{k}: {v}" for k, v in {**row.get("crashes", {}), **row.get("errors", {})}.items())
    return (f"| {row['name']} | {row.get('frontend', '-')} | {row.get('params_m', '-')} | {exact} | {train} | "
            f"{exported}/{len(targets)} | {checks} | {sqnr} | {share} | {verdict} | {cover} | {other} | **{status(row)}** | "
            f"{row.get('wall_s', '-')} | {notes.replace('|', '/')[:400]} |")


def render(rows: list[dict], targets: tuple[str, ...]) -> str:
    head = ("| model | front end | params (M) | λ=0 exact | train λ 0→1 | exports | `check` errors | "
            "worst SQNR ORT vs lowered (dB) | worst share > 1 LSB (%) | parity | weight ops quantized (ORT file) | "
            "HF file at batch 1, 3 | status | s | errors named |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    counts: dict[str, int] = {}
    for r in rows:
        counts[status(r)] = counts.get(status(r), 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return f"{len(rows)} models; {summary}\n\n" + head + "\n" + "\n".join(_fmt_row(r, targets) for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK)} on onnxruntime only")
    ap.add_argument("--only", default="", help="comma-separated row names (see benchmarks/zoo_models.py)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per worker")
    ap.add_argument("--all-torchvision", action="store_true", help="every torchvision width/depth variant")
    ap.add_argument("--exporter", default="", help="export_onnx(exporter=...) when it takes one (default: its default)")
    ap.add_argument("--ort-optimize", action="store_true",
                    help="parity on ONNX Runtime with its default graph optimizations (ORT_ENABLE_ALL: fused "
                         "integer kernels) instead of ORT_DISABLE_ALL")
    ap.add_argument("--jobs", type=int, default=1, help="models run side by side")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    ap.add_argument("--json", default="", help="also write the rows as JSON here")
    ap.add_argument("--from-json", default="", help="render (and write) the rows a stopped run saved with --json")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.targets = tuple(t for t in args.targets.split(",") if t)
    if args.ort_optimize:
        os.environ["QTRIM_ZOO_ORT_OPTIMIZE"] = "1"  # read by the workers (_session, _parity)
    if args.worker:
        Path(args.out).write_text(json.dumps(run_one(args.worker, args.targets, args.all_torchvision, args.exporter)))
        return 0
    names = list(all_models(args.all_torchvision))
    if args.quick:
        names, args.targets = list(QUICK), ("onnxruntime",)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            ap.error(f"unknown model(s) {unknown}; known: {', '.join(names)}")
        names = wanted
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        done = {r["name"] for r in rows}
        rows += [{"name": n, "not_run": True} for n in names if n not in done]
        return _finish(rows, args, argv)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(_spawn, name, args) for name in names]
        rows = []
        for fut in futures:
            rows.append(fut.result())
            print(_fmt_row(rows[-1], args.targets), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    return _finish(rows, args, argv)


def _finish(rows: list[dict], args: argparse.Namespace, argv: list[str] | None) -> int:
    table = render(rows, args.targets)
    print(table)
    if not args.no_write and not args.quick and (not args.only or args.from_json):
        cmd = "python benchmarks/zoo.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
        write_section("Model zoo (benchmarks/zoo.py)", f"`{cmd.strip()}` — {machine()}; targets "
                      f"{', '.join(args.targets)}; exporter {args.exporter or 'default'}; {args.jobs} worker(s).\n\n{table}")
    return 1 if any(status(r) in ("CRASH", "MISMATCH", "TIMEOUT", "NaN") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
