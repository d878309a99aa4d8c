"""The ``qtrim`` command line.

    qtrim inspect MODEL [--calibrate N] [--graph out.html|out.svg|out.dot] [--json sites.json]
    qtrim export MODEL -o out.onnx --target T [--checkpoint ckpt.pt] [--calibrate N] [--opset 21]
    qtrim check out.onnx --target T [--json violations.json]
    qtrim verify out.onnx --reference MODEL|fp32.onnx [--backends onnxruntime,openvino] [--json report.json]
                 [--per-layer] [--min-sqnr DB] [--min-top1 F] [--plots DIR]
    qtrim report MODEL -o DIR          curriculum, weight distributions before/after a reverse-pruning pin,
                                       graph, QDQ export and per-layer SQNR of a model, as PNG/HTML/JSON

MODEL is a built-in name (``tiny_convnet``, ``cifar_resnet18``, ``tv_resnet18`` ...),
``package.module:factory`` or ``path/file.py:factory``; a factory returns a module or
``(module, example_inputs)``.

Exit codes: 0 ok, 1 a check/verify found problems, 2 usage errors (bad MODEL, missing file, unknown
target, bad option; one line on stderr), 3 an unexpected failure (one line; ``--traceback`` shows where).
Progress bars appear on stderr when it is a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qtrim_fx import __version__

__all__ = ["UsageError", "build_parser", "load_model", "main"]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_FAILURE = 0, 1, 2, 3
MODEL_HELP = "built-in name (tiny_convnet, cifar_resnet18 ...), package.module:factory or path/file.py:factory"


class UsageError(Exception):
    """A bad command line: printed as one line, exit code 2."""


# --- models and inputs ---------------------------------------------------------------------------------


def _import_file(path: Path) -> Any:
    name = f"_qtrim_user_{path.stem}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise UsageError(f"cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))  # so the file's own sibling imports work
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"importing {str(path)!r} failed: {type(e).__name__}: {_one_line(e)}") from None
    return module


def load_model(spec: str) -> tuple[Any, tuple]:
    """Resolve a MODEL spec to ``(module, example_inputs)`` (example inputs may be ``()``).

    Args:
        spec: a built-in model name, ``package.module:factory`` or ``path/file.py:factory``.

    Returns:
        ``(module, example_inputs)``.

    Raises:
        UsageError: the spec names nothing that can be built.
    """
    import torch

    if ":" not in spec:
        from qtrim_fx.models import MODELS, get_model

        if spec not in MODELS:
            raise UsageError(f"unknown model {spec!r}: use a built-in name ({', '.join(sorted(MODELS))}), "
                             "package.module:factory or path/file.py:factory")
        return get_model(spec)
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"model file {where!r} does not exist")
        module = _import_file(path)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UsageError(f"cannot import {where!r}: {e}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"{where!r} has no callable {name!r}")
    try:
        out = factory()
    except Exception as e:
        raise UsageError(f"model factory {spec!r} failed: {type(e).__name__}: {_one_line(e)}") from None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module):
        inputs = out[1] if isinstance(out[1], tuple) else (out[1],)
        return out[0], inputs
    if isinstance(out, torch.nn.Module):
        return out, ()
    raise UsageError(f"factory {spec!r} must return an nn.Module or (module, example_inputs)")


def _random_batches(inputs: tuple, n: int, seed: int = 0) -> list[tuple]:
    """``n`` random batches shaped like ``inputs`` (floats ~ the example's mean/std; other dtypes kept)."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def like(t):
        if not t.is_floating_point():
            return t
        std = float(t.std()) if t.numel() > 1 else 1.0
        return torch.randn(t.shape, generator=gen, dtype=t.dtype) * std + float(t.mean())

    return [tuple(like(t) for t in inputs) for _ in range(n)]


def _check_target(target: str) -> None:
    from qtrim_fx.core.profiles import get_profile, profile_names

    try:
        get_profile(target)
    except Exception:
        raise UsageError(f"unknown target {target!r}; known targets: {', '.join(profile_names())}") from None


def _require_file(path: str, what: str) -> None:
    if not Path(path).is_file():
        raise UsageError(f"{what} {path!r} does not exist")


def _prepared(spec: str, checkpoint: str | None, calibrate: int, progress: Any = None) -> tuple[Any, Any, tuple]:
    """(prepared model, the float model sharing its parameters, example inputs)."""
    import torch

    import qtrim_fx

    if checkpoint:
        _require_file(checkpoint, "checkpoint")
    model, inputs = load_model(spec)
    _stage(progress, "prepare")
    qm = qtrim_fx.prepare(model, inputs or None)
    if checkpoint:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"cannot read checkpoint {checkpoint!r}: {_one_line(e)}") from None
        state = state.get("model", state) if isinstance(state, dict) else state
        try:
            qm.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise UsageError(f"checkpoint {checkpoint!r} does not fit {spec}: {_one_line(e)}") from None
    if calibrate:
        if not inputs:
            raise UsageError(f"--calibrate needs example inputs; {spec} returned none")
        _stage(progress, f"calibrate ({calibrate + 1} batches)")
        qtrim_fx.calibrate(qm, [inputs, *_random_batches(inputs, calibrate)], progress=_tty())
    return qm, model, inputs


def _default_calibration(args: argparse.Namespace) -> int:
    if args.calibrate is not None:
        return args.calibrate
    return 0 if args.checkpoint else 4


# --- output helpers ------------------------------------------------------------------------------------


def _one_line(e: BaseException | str, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tty() -> bool:
    return sys.stderr.isatty()


class _Stages:
    """A one-line progress display over the named stages of a command (only when stderr is a terminal)."""

    def __init__(self, title: str, total: int) -> None:
        from tqdm.auto import tqdm

        self.title, self.total, self.done = title, total, -1
        self.bar = tqdm(total=total, desc=title, disable=not _tty(), leave=False, file=sys.stderr,
                        bar_format="{desc}")

    def next(self, name: str) -> None:
        self.done += 1
        self.bar.update(1 if self.done else 0)
        self.bar.set_description_str(f"{self.title} [{min(self.done + 1, self.total)}/{self.total}] {name}")

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def _stages(title: str, total: int) -> Iterator[_Stages]:
    stages = _Stages(title, total)
    try:
        yield stages
    finally:
        stages.close()


def _stage(stages: _Stages | None, name: str) -> None:
    if stages is not None:
        stages.next(name)


def _require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("plots need matplotlib: pip install matplotlib")


def _write_json(path: str, data: Any) -> None:
    from qtrim_fx.verification.report import _json_safe

    Path(path).write_text(json.dumps(_json_safe(data), indent=2) + "\n")


# --- commands ------------------------------------------------------------------------------------------


def _cmd_inspect(args: argparse.Namespace) -> int:
    import qtrim_fx
    from qtrim_fx.tools.graph_view import FORMATS, write_graph

    for g in args.graph or ():
        if Path(g).suffix.lower() not in FORMATS:
            raise UsageError(f"--graph {g!r}: use a .html, .svg or .dot file name")
    with _stages("qtrim inspect", 2 + bool(args.calibrate) + bool(args.graph)) as bar:
        qm, _, _ = _prepared(args.model, args.checkpoint, args.calibrate or 0, bar)
        _stage(bar, "inspect")
        report = qtrim_fx.inspect(qm)
        if args.graph:
            _stage(bar, "draw graph")
            for g in args.graph:
                write_graph(qm, g)
    print(report.table())
    for g in args.graph or ():
        print(f"wrote {g}")
    if args.json:
        _write_json(args.json, report.to_dict())
        print(f"wrote {args.json}")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    import qtrim_fx
    from qtrim_fx.onnx.export_model import export_onnx

    _check_target(args.target)
    calibrate = _default_calibration(args)
    with _stages("qtrim export", 2 + bool(calibrate)) as bar:
        qm, _, inputs = _prepared(args.model, args.checkpoint, calibrate, bar)
        if not inputs:
            raise UsageError(f"{args.model} gives no example inputs to trace with")
        _stage(bar, f"export ({args.target})")
        qtrim_fx.set_blend(qm, 1.0)
        export_onnx(qm, inputs, args.output, args.target, opset=args.opset)
    print(f"wrote {args.output} (target {args.target})")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    import onnx

    from qtrim_fx.onnx.check import check

    _require_file(args.onnx, "file")
    _check_target(args.target)
    try:
        model = onnx.load(args.onnx, load_external_data=False)
    except Exception as e:
        raise UsageError(f"cannot read {args.onnx!r} as ONNX: {_one_line(e)}") from None
    del model
    problems = check(args.onnx, args.target)
    for v in problems:
        print(f"[{v.severity}] {v.rule}: {v.node}: {v.message}")
    errors = sum(v.severity == "error" for v in problems)
    print(f"{len(problems)} violation(s) of target {args.target!r} in {args.onnx} "
          f"({errors} error(s), {len(problems) - errors} warning(s))")
    if args.json:
        _write_json(args.json, {"file": args.onnx, "target": args.target,
                                "violations": [dataclasses.asdict(v) for v in problems]})
    return EXIT_PROBLEMS if problems else EXIT_OK


def _onnx_batches(path: str, n: int, batch_size: int) -> list[tuple]:
    """Random batches for the inputs of an ONNX file (symbolic dimensions take ``batch_size``)."""
    import numpy as np
    import onnx
    import torch

    model = onnx.load(path, load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    gen = torch.Generator().manual_seed(0)
    specs = []
    for i in model.graph.input:
        if i.name in init:
            continue
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else batch_size for d in tt.shape.dim]
        specs.append((shape, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    out = []
    for _ in range(n):
        batch = []
        for shape, dtype in specs:
            if np.issubdtype(dtype, np.floating):
                batch.append(torch.randn(shape, generator=gen).numpy().astype(dtype))
            else:
                batch.append(np.zeros(shape, dtype))
        out.append(tuple(batch))
    return out


def _reference(args: argparse.Namespace, progress: Any) -> tuple[Any, list]:
    """(reference module or FP32 ONNX path, input batches) for ``verify``."""
    if args.reference.endswith(".onnx"):
        _require_file(args.reference, "reference file")
        if args.checkpoint:
            raise UsageError("--checkpoint applies to a MODEL reference, not to an ONNX file")
        return args.reference, _onnx_batches(args.onnx, args.batches, args.batch_size)
    if args.checkpoint:
        _, model, inputs = _prepared(args.reference, args.checkpoint, 0, progress)
    else:
        model, inputs = load_model(args.reference)
    if not inputs:
        raise UsageError(f"{args.reference} gives no example inputs")
    return model.eval(), [inputs, *_random_batches(inputs, args.batches - 1, seed=1)]


def _side_by_side(report: Any) -> list[str]:
    """The backends' figures as columns, one block per output (the same figures as the full table)."""
    from qtrim_fx.verification.report import _cos, _db, _pct, _sci

    ran = [b for b in report.backends if b.status == "ok"]
    if len(ran) < 2:
        return []
    lines = []
    for k, name in enumerate(report.output_names):
        metrics = [b.outputs[k] for b in ran]
        lines += ["", f"Side by side, output {name!r}: each backend vs the reference"]
        rows = [["metric", *(b.backend for b in ran)],
                ["SQNR dB", *(_db(m.sqnr_db) for m in metrics)],
                ["MSE", *(_sci(m.mse) for m in metrics)],
                ["max|err|", *(_sci(m.max_abs_err) for m in metrics)],
                ["cosine", *(_cos(m.cosine) for m in metrics)],
                ["top-1", *(_pct(m.top1) for m in metrics)]]
        if k == 0:
            rows.append(["time ms", *(f"{1000.0 * b.seconds:.2f}" for b in ran)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def _cmd_verify(args: argparse.Namespace) -> int:
    from qtrim_fx.verification.run import BACKENDS, verify

    _require_file(args.onnx, "file")
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise UsageError(f"unknown backend(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(BACKENDS)}")
    if args.batches < 1:
        raise UsageError("--batches must be at least 1")
    if args.min_top1 is not None and not 0.0 <= args.min_top1 <= 1.0:
        raise UsageError(f"--min-top1 {args.min_top1} must be a fraction in [0, 1], e.g. 0.99")
    per_layer = args.per_layer or bool(args.plots)
    if args.plots:
        _require_matplotlib()
    with _stages("qtrim verify", 2 + bool(args.checkpoint)) as bar:
        reference, batches = _reference(args, bar)
        _stage(bar, f"run {', '.join(backends)}" + (" + per layer" if per_layer else ""))
        report = verify(args.onnx, reference, batches, backends=backends, per_layer=per_layer)
    failures = report.failures(args.min_sqnr, args.min_top1)
    print(report.table())
    print("\n".join(_side_by_side(report)))
    print()
    print("\n".join(f"FAIL: {f}" for f in failures) if failures else "verify: ok")
    if args.json:
        _write_json(args.json, {**report.to_dict(), "failures": failures})
    if args.markdown:
        report.to_markdown(args.markdown)
    if args.plots:
        _plot_layers(report, Path(args.plots))
    return EXIT_PROBLEMS if failures else EXIT_OK


def _plot_layers(report: Any, folder: Path) -> Path | None:
    from qtrim_fx.tools.plots import plot_layer_sqnr

    folder.mkdir(parents=True, exist_ok=True)
    try:
        path = plot_layer_sqnr(report, folder / "layer_sqnr.png")
    except ValueError as e:
        print(f"qtrim: warning: no per-layer plot: {_one_line(e)}", file=sys.stderr)
        return None
    print(f"wrote {path}")
    return path


def _cmd_vendors(args: argparse.Namespace) -> int:
    from qtrim_fx.verification.vendors import DEFAULT_VARIANTS, QUICK_VARIANTS, vendor_sweep

    qm, _model, inputs = _prepared(args.model, args.checkpoint, _default_calibration(args))
    if not inputs:
        raise UsageError(f"{args.model} gives no example inputs")
    calib = [b[0] for b in _random_batches(inputs, args.calib_batches, seed=1)]
    evaluation = [b[0] for b in _random_batches(inputs, args.eval_batches, seed=2)]
    variants = QUICK_VARIANTS if args.variants == "quick" else DEFAULT_VARIANTS
    report = vendor_sweep(qm, calib, evaluation, variants=variants, backends=tuple(args.backends.split(",")),
                          weight_bits=args.weight_bits, progress=_tty())
    print(report.table())
    if args.json:
        report.to_json(args.json)
    if args.plot:
        report.plot(args.plot)
    return 0 if report.ok_rows() else EXIT_PROBLEMS


def _cmd_report(args: argparse.Namespace) -> int:
    import qtrim_fx
    from qtrim_fx.onnx.export_model import export_onnx
    from qtrim_fx.tools.graph_view import write_graph
    from qtrim_fx.tools.plots import plot_curriculum, plot_weight_distributions
    from qtrim_fx.verification.run import verify

    _check_target(args.target)
    _require_matplotlib()
    try:
        curriculum = qtrim_fx.Curriculum(args.warmup, args.ramp_end, args.horizon)
        pruner = qtrim_fx.ReversePruner(p_clip=args.p_clip, every=args.every)
    except ValueError as e:
        raise UsageError(_one_line(e)) from None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with _stages("qtrim report", 7) as bar:
        _stage(bar, "curriculum plot")
        written.append(plot_curriculum(curriculum, args.epochs, out / "curriculum.png", pins=pruner))
        qm, model, inputs = _prepared(args.model, args.checkpoint, 0, bar)
        if not inputs:
            raise UsageError(f"{args.model} gives no example inputs")
        _stage(bar, "reverse-pruning pin")
        trim = qtrim_fx.QuantTrim(qm, curriculum, pruner)
        params = [s.param for s, _, _ in qtrim_fx.iter_sites(qm) if s.kind == "weight" and s.param]
        before = {p: qm.get_parameter(p).detach().clone() for p in params}
        trim.epoch_start(math.ceil(curriculum.warmup))  # the first pin epoch
        after = {p: qm.get_parameter(p).detach().clone() for p in params}
        taus = dict(zip(params, pruner.thresholds, strict=True))
        written.append(plot_weight_distributions(before, after, out / "weights.png", thresholds=taus))
        _stage(bar, "calibrate")
        batches = [inputs, *_random_batches(inputs, args.calibrate)]
        qtrim_fx.calibrate(qm, batches, progress=_tty())
        written.append(write_graph(qm, out / "graph.html"))
        _stage(bar, f"export ({args.target})")
        onnx_path = out / "model.qdq.onnx"
        qtrim_fx.set_blend(qm, 1.0)
        export_onnx(qm, inputs, onnx_path, args.target)
        written.append(onnx_path)
        _stage(bar, "verify")
        backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
        report = verify(onnx_path, model.eval(), batches, backends=backends, per_layer=True)
        _write_json(str(out / "verify.json"), report.to_dict())
        written.append(out / "verify.json")
        _stage(bar, "per-layer plot")
    print(report.table())
    print()
    for p in written:
        print(f"wrote {p}")
    _plot_layers(report, out)
    return EXIT_PROBLEMS if report.failures() else EXIT_OK


# --- parser --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) that point at ``--help``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _sub(sub: Any, name: str, help: str, description: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _model_options(p: argparse.ArgumentParser, calibrate_default: str) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--checkpoint", help="state_dict of the prepared model (torch.save), e.g. after training")
    p.add_argument("--calibrate", type=int, metavar="N",
                   help=f"calibrate on the example inputs + N random batches ({calibrate_default})")


def build_parser() -> argparse.ArgumentParser:
    """The ``qtrim`` argument parser (one sub-command per action)."""
    parser = _Parser(
        prog="qtrim",
        description="Quant-Trim for PyTorch: prepare, inspect, export, check and verify quantized models.",
        epilog="exit codes: 0 ok, 1 problems found, 2 usage error, 3 unexpected failure",
    )
    parser.add_argument("--version", action="version", version=f"qtrim_fx {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of a failure")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = _sub(sub, "inspect", "prepare MODEL and print its quantization sites",
             "Prepare MODEL (insert observer + blend-quant sites) and print one row per site.",
             "qtrim inspect tiny_convnet --calibrate 2 --graph tiny.html")
    _model_options(p, "default: none, so no scales are shown")
    p.add_argument("--graph", action="append", metavar="PATH",
                   help="draw the prepared graph, sites highlighted: .html (page with sites table), .svg or "
                        ".dot; repeat for several files")
    p.add_argument("--json", metavar="PATH", help="write the sites table as JSON")
    p.set_defaults(handler=_cmd_inspect)

    p = _sub(sub, "export", "prepare (or load) MODEL and write a QDQ ONNX file",
             "Fold BatchNorm, lower every site to QuantizeLinear/DequantizeLinear for the target and write ONNX.",
             "qtrim export tiny_convnet --calibrate 4 -o tiny.qdq.onnx --target onnxruntime")
    _model_options(p, "default: 4 without --checkpoint, else 0")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.add_argument("--target", default="onnxruntime", help="onnxruntime (default), tensorrt, openvino, qnn, npu")
    p.add_argument("--opset", type=int, help="override the target's opset (21 for INT4)")
    p.set_defaults(handler=_cmd_export)

    p = _sub(sub, "check", "list violations of a target's rules in an ONNX file",
             "List every rule of the target that a QDQ ONNX file breaks (exit 1 if any).",
             "qtrim check tiny.qdq.onnx --target tensorrt")
    p.add_argument("onnx", metavar="ONNX", help="the .onnx file (ours or made by another tool)")
    p.add_argument("--target", default="onnxruntime", help="onnxruntime (default), tensorrt, openvino, qnn, npu")
    p.add_argument("--json", metavar="PATH", help="write the violations as JSON")
    p.set_defaults(handler=_cmd_check)

    p = _sub(sub, "verify", "run an ONNX file on several runtimes against the reference",
             "Run the ONNX file on each backend and the reference on the same random batches; print MSE, "
             "SQNR, max|err|, cosine and top-1 per backend, side by side, and between backend pairs.",
             "qtrim verify tiny.qdq.onnx --reference tiny_convnet --backends onnxruntime,openvino --json r.json")
    p.add_argument("onnx", metavar="ONNX", help="the model to verify (usually the QDQ export)")
    p.add_argument("--reference", required=True, metavar="MODEL|FP32.onnx",
                   help=f"the FP32 reference: {MODEL_HELP}, or an FP32 .onnx file")
    p.add_argument("--checkpoint", help="load this prepared-model state_dict into the MODEL reference")
    p.add_argument("--backends", default="onnxruntime,onnxruntime-noopt,openvino",
                   help="comma-separated: onnxruntime, onnxruntime-noopt, openvino, onnx-reference, qnn")
    p.add_argument("--batches", type=int, default=4, help="number of input batches (default 4)")
    p.add_argument("--batch-size", type=int, default=2,
                   help="batch size for an ONNX reference's symbolic batch dimension (default 2)")
    p.add_argument("--per-layer", action="store_true", help="also compare intermediate tensors per layer")
    p.add_argument("--min-sqnr", type=float, metavar="DB", help="fail (exit 1) below this output SQNR")
    p.add_argument("--min-top1", type=float, metavar="F", help="fail (exit 1) below this top-1 agreement (0..1)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON (every figure of the table)")
    p.add_argument("--markdown", metavar="PATH", help="write the report as Markdown")
    p.add_argument("--plots", metavar="DIR", help="write DIR/layer_sqnr.png (implies --per-layer)")
    p.set_defaults(handler=_cmd_verify)

    p = _sub(sub, "report", "plots and files showing what Quant-Trim does to MODEL",
             "Write into DIR: curriculum.png (λ_t and pin epochs), weights.png (weight histograms before/after "
             "one reverse-pruning pin), graph.html (prepared graph, sites highlighted), model.qdq.onnx, "
             "verify.json and layer_sqnr.png (per-layer SQNR vs the FP32 model).",
             "qtrim report tiny_convnet -o report/")
    _model_options(p, "default: 4")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--target", default="onnxruntime", help="export target (default onnxruntime)")
    p.add_argument("--backends", default="onnxruntime,openvino", help="verify backends (comma-separated)")
    p.add_argument("--epochs", type=int, default=80, help="curriculum plot length (default 80)")
    p.add_argument("--warmup", type=float, default=10, help="curriculum E_w (default 10)")
    p.add_argument("--ramp-end", type=float, default=50, help="curriculum E_f (default 50)")
    p.add_argument("--horizon", type=float, default=20, help="curriculum H (default 20)")
    p.add_argument("--p-clip", type=float, default=0.95, help="reverse-pruning quantile (default 0.95)")
    p.add_argument("--every", type=int, default=5, help="epochs between pins (default 5)")
    p.set_defaults(handler=_cmd_report, calibrate=4)

    p = _sub(sub, "vendors", "quantize MODEL's float graph like vendor tools do and measure the spread",
             "Quantize the checkpoint's FP32 graph with independent tools (ONNX Runtime quantize_static: "
             "MinMax / Percentile / Entropy, per-tensor / per-channel, u8 / s8, 32 / 256 calibration "
             "samples) plus our embedded-scale export; run each on ONNX Runtime and OpenVINO; print top-1 "
             "(agreement with FP32 without labels) and logit MSE per variant and their spread.",
             "qtrim vendors tiny_convnet --variants quick --json vendors.json --plot vendors.png")
    _model_options(p, "default: 4 without --checkpoint, else 0")
    p.add_argument("--variants", choices=("quick", "full"), default="full", help="variant matrix (default full)")
    p.add_argument("--backends", default="onnxruntime,openvino", help="comma-separated runtimes")
    p.add_argument("--weight-bits", type=int, choices=(4, 8), default=8, help="weight bits (default 8)")
    p.add_argument("--calib-batches", type=int, default=8, help="random calibration batches (default 8)")
    p.add_argument("--eval-batches", type=int, default=8, help="random evaluation batches (default 8)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--plot", metavar="PNG", help="write the top-1 matrix as a PNG")
    p.set_defaults(handler=_cmd_vendors)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"qtrim: warning: {_one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qtrim`` command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_OK
    debug = args.traceback or bool(os.environ.get("QTRIM_TRACEBACK"))
    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.showwarning = _show_warning
        try:
            return int(handler(args) or 0)
        except UsageError as e:
            print(f"qtrim: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("qtrim: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            from qtrim_fx.core import errors

            # qtrim's own errors about the user's input (not VerifyError or internal contract errors)
            user_errors = (errors.ConfigError, errors.CaptureError, errors.CheckpointError, errors.ProfileError,
                           errors.ExportError)
            if debug:
                raise
            usage = isinstance(e, (*user_errors, FileNotFoundError, IsADirectoryError, NotADirectoryError))
            print(f"qtrim: error: {type(e).__name__}: {_one_line(e)}"
                  + ("" if usage else " (run with --traceback for details)"), file=sys.stderr)
            return EXIT_USAGE if usage else EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
