"""The ``qtrim`` sub-commands: one ``cmd_*`` function per command, called with the parsed arguments.

Each returns the exit code (:data:`~qtrim_fx.tools.cli_common.EXIT_OK` or ``EXIT_PROBLEMS``) and
raises :class:`~qtrim_fx.tools.cli_common.UsageError` for a bad command line. Heavy imports (torch,
onnx, the verification back ends) stay inside the functions so that ``qtrim --help`` starts fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

from qtrim_fx.tools.cli_common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    UsageError,
    check_target,
    default_calibration,
    load_model,
    one_line,
    prepared,
    random_batches,
    require_file,
    require_matplotlib,
    stage,
    stages,
    tty,
    write_json,
)

__all__ = [
    "cmd_check",
    "cmd_export",
    "cmd_inspect",
    "cmd_report",
    "cmd_vendors",
    "cmd_verify",
    "onnx_batches",
    "plot_layers",
    "side_by_side",
]


def cmd_inspect(args: argparse.Namespace) -> int:
    """``qtrim inspect``: print the sites table; optionally draw the graph and write the table as JSON."""
    import qtrim_fx
    from qtrim_fx.core.errors import UncalibratedSitesError
    from qtrim_fx.tools.graph_view import FORMATS, write_graph

    for g in args.graph or ():
        if Path(g).suffix.lower() not in FORMATS:
            raise UsageError(f"--graph {g!r}: use a .html, .svg or .dot file name")
    if args.target is not None:
        check_target(args.target)
    with stages("qtrim inspect", 2 + bool(args.calibrate) + bool(args.graph)) as bar:
        qm, _, _ = prepared(args.model, args.checkpoint, args.calibrate or 0, bar)
        stage(bar, "inspect")
        try:
            report = qtrim_fx.inspect(qm, target=args.target)
        except UncalibratedSitesError:
            # planning a target derives qparams from statistics, which an uncalibrated model lacks
            raise UsageError(f"--target {args.target} needs statistics: add --calibrate N "
                             "or a --checkpoint of a trained model") from None
        if args.graph:
            stage(bar, "draw graph")
            for g in args.graph:
                write_graph(qm, g)
    print(report.table())
    for g in args.graph or ():
        print(f"wrote {g}")
    if args.json:
        write_json(args.json, report.to_dict())
        print(f"wrote {args.json}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """``qtrim export``: prepare (and calibrate) MODEL and write its QDQ ONNX file for the target."""
    import qtrim_fx
    from qtrim_fx.onnx.export_model import export_onnx

    check_target(args.target)
    calibrate = default_calibration(args)
    with stages("qtrim export", 2 + bool(calibrate)) as bar:
        qm, _, inputs = prepared(args.model, args.checkpoint, calibrate, bar)
        if not inputs:
            raise UsageError(f"{args.model} gives no example inputs to trace with")
        stage(bar, f"export ({args.target})")
        qtrim_fx.set_blend(qm, 1.0)
        export_onnx(qm, inputs, args.output, args.target, opset=args.opset)
    print(f"wrote {args.output} (target {args.target})")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """``qtrim check``: list the target's rules an ONNX file breaks (exit 1 if any)."""
    import onnx

    from qtrim_fx.onnx.check import check

    require_file(args.onnx, "file")
    check_target(args.target)
    try:
        model = onnx.load(args.onnx, load_external_data=False)
    except Exception as e:
        raise UsageError(f"cannot read {args.onnx!r} as ONNX: {one_line(e)}") from None
    del model
    problems = check(args.onnx, args.target)
    for v in problems:
        print(f"[{v.severity}] {v.rule}: {v.node}: {v.message}")
    errors = sum(v.severity == "error" for v in problems)
    print(f"{len(problems)} violation(s) of target {args.target!r} in {args.onnx} "
          f"({errors} error(s), {len(problems) - errors} warning(s))")
    if args.json:
        write_json(args.json, {"file": args.onnx, "target": args.target,
                               "violations": [dataclasses.asdict(v) for v in problems]})
    return EXIT_PROBLEMS if problems else EXIT_OK


def onnx_batches(path: str, n: int, batch_size: int) -> list[tuple]:
    """Random batches for the inputs of an ONNX file: :func:`qtrim_fx.verification.run.random_inputs`
    (symbolic dimensions take ``batch_size``; a batch above its size cap is refused, not allocated)."""
    from qtrim_fx.verification.run import random_inputs

    return random_inputs(path, n, batch_size)


def _reference(args: argparse.Namespace, progress: Any) -> tuple[Any, list]:
    """(reference module or FP32 ONNX path, input batches) for ``verify``."""
    if args.reference.endswith(".onnx"):
        require_file(args.reference, "reference file")
        if args.checkpoint:
            raise UsageError("--checkpoint applies to a MODEL reference, not to an ONNX file")
        return args.reference, onnx_batches(args.onnx, args.batches, args.batch_size)
    if args.checkpoint:
        _, model, inputs = prepared(args.reference, args.checkpoint, 0, progress)
    else:
        model, inputs = load_model(args.reference)
    if not inputs:
        raise UsageError(f"{args.reference} gives no example inputs")
    return model.eval(), [inputs, *random_batches(inputs, args.batches - 1, seed=1)]


def side_by_side(report: Any) -> list[str]:
    """The backends' figures as columns, one block per output (the same figures as the full table).

    Args:
        report: a :class:`~qtrim_fx.verification.report.VerifyReport`.

    Returns:
        The text lines (none when fewer than two backends ran).
    """
    # private names of verification/report.py, left as is until that module's owner makes them public
    from qtrim_fx.verification.report import format_cosine, format_db, format_pct, format_sci

    ran = [b for b in report.backends if b.status == "ok"]
    if len(ran) < 2:
        return []
    lines = []
    for k, name in enumerate(report.output_names):
        metrics = [b.outputs[k] for b in ran]
        lines += ["", f"Side by side, output {name!r}: each backend vs the reference"]
        rows = [["metric", *(b.backend for b in ran)],
                ["SQNR dB", *(format_db(m.sqnr_db) for m in metrics)],
                ["MSE", *(format_sci(m.mse) for m in metrics)],
                ["max|err|", *(format_sci(m.max_abs_err) for m in metrics)],
                ["cosine", *(format_cosine(m.cosine) for m in metrics)],
                ["top-1", *(format_pct(m.top1) for m in metrics)]]
        if k == 0:
            rows.append(["time ms", *(f"{1000.0 * b.seconds:.2f}" for b in ran)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def _verify_backends(args: argparse.Namespace) -> tuple[str, ...]:
    """Check ``verify``'s options before anything slow runs; the backends asked for."""
    from qtrim_fx.verification.run import BACKENDS

    require_file(args.onnx, "file")
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise UsageError(f"unknown backend(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(BACKENDS)}")
    if args.batches < 1:
        raise UsageError("--batches must be at least 1")
    if args.min_top1 is not None and not 0.0 <= args.min_top1 <= 1.0:
        raise UsageError(f"--min-top1 {args.min_top1} must be a fraction in [0, 1], e.g. 0.99")
    if args.plots:
        require_matplotlib()
    return backends


def cmd_verify(args: argparse.Namespace) -> int:
    """``qtrim verify``: run an ONNX file on several back ends against the reference (exit 1 on failures)."""
    from qtrim_fx.verification.run import verify

    backends = _verify_backends(args)
    per_layer = args.per_layer or bool(args.plots)
    with stages("qtrim verify", 2 + bool(args.checkpoint)) as bar:
        reference, batches = _reference(args, bar)
        stage(bar, f"run {', '.join(backends)}" + (" + per layer" if per_layer else ""))
        report = verify(args.onnx, reference, batches, backends=backends, per_layer=per_layer)
    failures = report.failures(args.min_sqnr, args.min_top1)
    print(report.table())
    print("\n".join(side_by_side(report)))
    print()
    print("\n".join(f"FAIL: {f}" for f in failures) if failures else "verify: ok")
    if args.json:
        write_json(args.json, {**report.to_dict(), "failures": failures})
    if args.markdown:
        report.to_markdown(args.markdown)
    if args.plots:
        plot_layers(report, Path(args.plots))
    return EXIT_PROBLEMS if failures else EXIT_OK


def plot_layers(report: Any, folder: Path) -> Path | None:
    """Write ``folder/layer_sqnr.png`` from a per-layer verify report.

    Args:
        report: a verify report with per-layer figures.
        folder: the output folder (created if missing).

    Returns:
        The PNG path, or None (with a warning on stderr) when the report has no per-layer figures.
    """
    from qtrim_fx.tools.plots import plot_layer_sqnr

    folder.mkdir(parents=True, exist_ok=True)
    try:
        path = plot_layer_sqnr(report, folder / "layer_sqnr.png")
    except ValueError as e:
        print(f"qtrim: warning: no per-layer plot: {one_line(e)}", file=sys.stderr)
        return None
    print(f"wrote {path}")
    return path


def cmd_vendors(args: argparse.Namespace) -> int:
    """``qtrim vendors``: quantize MODEL's float graph like vendor tools do and print the spread."""
    from qtrim_fx.verification.vendors import DEFAULT_VARIANTS, QUICK_VARIANTS, vendor_sweep

    qm, _model, inputs = prepared(args.model, args.checkpoint, default_calibration(args))
    if not inputs:
        raise UsageError(f"{args.model} gives no example inputs")
    calib = [b[0] for b in random_batches(inputs, args.calib_batches, seed=1)]
    evaluation = [b[0] for b in random_batches(inputs, args.eval_batches, seed=2)]
    variants = QUICK_VARIANTS if args.variants == "quick" else DEFAULT_VARIANTS
    report = vendor_sweep(qm, calib, evaluation, variants=variants, backends=tuple(args.backends.split(",")),
                          weight_bits=args.weight_bits, progress=tty())
    print(report.table())
    if args.json:
        report.to_json(args.json)
    if args.plot:
        report.plot(args.plot)
    return 0 if report.ok_rows() else EXIT_PROBLEMS


def _pin_weights_plot(qm: Any, curriculum: Any, pruner: Any, path: Path) -> Path:
    """Run the first reverse-pruning pin on ``qm`` and plot its weights before and after it."""
    import qtrim_fx
    from qtrim_fx.tools.plots import plot_weight_distributions

    trim = qtrim_fx.QuantTrim(qm, curriculum, pruner)
    params = [s.param for s, _, _ in qtrim_fx.iter_sites(qm) if s.kind == "weight" and s.param]
    before = {p: qm.get_parameter(p).detach().clone() for p in params}
    trim.epoch_start(math.ceil(curriculum.warmup))  # the first pin epoch
    after = {p: qm.get_parameter(p).detach().clone() for p in params}
    taus = dict(zip(params, pruner.thresholds, strict=True))
    return plot_weight_distributions(before, after, path, thresholds=taus)


def cmd_report(args: argparse.Namespace) -> int:
    """``qtrim report``: curriculum and weight plots, graph, QDQ export and per-layer SQNR, into a folder."""
    import qtrim_fx
    from qtrim_fx.onnx.export_model import export_onnx
    from qtrim_fx.tools.graph_view import write_graph
    from qtrim_fx.tools.plots import plot_curriculum
    from qtrim_fx.verification.run import verify

    check_target(args.target)
    require_matplotlib()
    try:
        curriculum = qtrim_fx.Curriculum(args.warmup, args.ramp_end, args.horizon)
        pruner = qtrim_fx.ReversePruner(p_clip=args.p_clip, every=args.every)
    except ValueError as e:
        raise UsageError(one_line(e)) from None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with stages("qtrim report", 7) as bar:
        stage(bar, "curriculum plot")
        written.append(plot_curriculum(curriculum, args.epochs, out / "curriculum.png", pins=pruner))
        qm, model, inputs = prepared(args.model, args.checkpoint, 0, bar)
        if not inputs:
            raise UsageError(f"{args.model} gives no example inputs")
        stage(bar, "reverse-pruning pin")
        written.append(_pin_weights_plot(qm, curriculum, pruner, out / "weights.png"))
        stage(bar, "calibrate")
        batches = [inputs, *random_batches(inputs, args.calibrate)]
        qtrim_fx.calibrate(qm, batches, progress=tty())
        written.append(write_graph(qm, out / "graph.html"))
        stage(bar, f"export ({args.target})")
        onnx_path = out / "model.qdq.onnx"
        qtrim_fx.set_blend(qm, 1.0)
        export_onnx(qm, inputs, onnx_path, args.target)
        written.append(onnx_path)
        stage(bar, "verify")
        backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
        report = verify(onnx_path, model.eval(), batches, backends=backends, per_layer=True)
        write_json(str(out / "verify.json"), report.to_dict())
        written.append(out / "verify.json")
        stage(bar, "per-layer plot")
    print(report.table())
    print()
    for p in written:
        print(f"wrote {p}")
    plot_layers(report, out)
    return EXIT_PROBLEMS if report.failures() else EXIT_OK
