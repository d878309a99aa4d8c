"""The ``qtrim`` sub-commands: one ``cmd_*`` function per command, called with the parsed arguments.

Each returns the exit code (:data:`~qtrim_fx.tools.cli_common.EXIT_OK` or ``EXIT_PROBLEMS``) and
raises :class:`~qtrim_fx.tools.cli_common.UsageError` for a bad command line. Heavy imports (torch,
onnx, the verification back ends) stay inside the functions so that ``qtrim --help`` starts fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

from qtrim_fx.tools.cli_common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    UsageError,
    check_target,
    default_calibration,
    one_line,
    prepared,
    random_batches,
    require_file,
    require_matplotlib,
    require_output,
    require_output_folder,
    stage,
    stages,
    tty,
    user_model_check,
    write_json,
    write_text,
)
from qtrim_fx.tools.cli_verify import (
    check_deterministic,
    cmd_verify,
    onnx_batches,
    parse_backends,
    plot_layers,
    side_by_side,
)
from qtrim_fx.tools.sanitize import map_strings, printable

__all__ = [
    "REPORT_FILES",
    "VENDOR_BACKENDS",
    "check_deterministic",
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


#: the runtimes ``qtrim vendors`` runs its variants on
VENDOR_BACKENDS = ("onnxruntime", "openvino")


#: the files ``qtrim report`` writes into its folder
REPORT_FILES = ("curriculum.png", "weights.png", "graph.html", "model.qdq.onnx", "verify.json", "layer_sqnr.png")


def cmd_inspect(args: argparse.Namespace) -> int:
    """``qtrim inspect``: print the sites table; optionally draw the graph and write the table as JSON."""
    import qtrim_fx
    from qtrim_fx.core.errors import UncalibratedSitesError
    from qtrim_fx.tools.graph_view import FORMATS, write_graph

    for g in args.graph or ():
        if Path(g).suffix.lower() not in FORMATS:
            raise UsageError(f"--graph {g!r}: use a .html, .svg or .dot file name")
        require_output(g, "--graph")
    if args.json:
        require_output(args.json, "--json")
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
    from qtrim_fx.core.errors import QtrimError
    from qtrim_fx.onnx.export_model import export_onnx

    check_target(args.target)
    require_output(args.output, "-o")
    calibrate = default_calibration(args)
    with stages("qtrim export", 2 + (calibrate != 0)) as bar:
        qm, model, inputs = prepared(args.model, args.checkpoint, calibrate, bar, target=args.target)
        if not inputs:
            raise UsageError(f"{printable(args.model)} gives no example inputs to trace with")
        stage(bar, f"export ({args.target})")
        qtrim_fx.set_blend(qm, 1.0)
        try:
            export_onnx(qm, inputs, args.output, args.target, opset=args.opset)
        except QtrimError:
            raise
        except Exception as e:
            user_model_check(args.model, model, inputs, e)
            raise
    print(f"wrote {args.output} (target {args.target})")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """``qtrim check``: list the target's rules an ONNX file breaks (exit 1 if any)."""
    import onnx

    from qtrim_fx.onnx.check import check

    require_file(args.onnx, "file")
    if args.target is not None:
        check_target(args.target)
    if args.json:
        require_output(args.json, "--json")
    try:
        model = onnx.load(args.onnx, load_external_data=False)
    except Exception as e:
        raise UsageError(f"cannot read {args.onnx!r} as ONNX: {one_line(e)}") from None
    if args.target is None:
        args.target = _written_for(model)
    del model
    problems = check(args.onnx, args.target)
    for v in problems:  # node names and messages come from the file: no control characters to the terminal
        print(printable(f"[{v.severity}] {v.rule}: {v.node}: {v.message}"))
    errors = sum(v.severity == "error" for v in problems)
    print(f"{len(problems)} violation(s) of target {args.target!r} in {printable(args.onnx)} "
          f"({errors} error(s), {len(problems) - errors} warning(s))")
    if args.json:
        write_json(args.json, {"file": args.onnx, "target": args.target,
                               "violations": [dataclasses.asdict(v) for v in problems]})
    return EXIT_PROBLEMS if problems else EXIT_OK


def _written_for(model: Any) -> str:
    """The target a qtrim_fx file says it was written for (``metadata_props``), else ``onnxruntime``; said on stdout."""
    from qtrim_fx.core.profiles import profile_names

    stamp = {p.key: p.value for p in model.metadata_props}.get("qtrim_fx.target")
    if stamp in profile_names():
        print(f"target {stamp!r}: the file was written for it (--target to check another)")
        return stamp
    if stamp is not None:
        print(f"target 'onnxruntime': the file names target {printable(stamp)!r}, which is not known here")
    return "onnxruntime"


def cmd_vendors(args: argparse.Namespace) -> int:
    """``qtrim vendors``: quantize MODEL's float graph like vendor tools do and print the spread."""
    from qtrim_fx.verification.vendors import DEFAULT_VARIANTS, QUICK_VARIANTS, vendor_sweep

    backends = parse_backends(args.backends, VENDOR_BACKENDS)
    if args.calib_batches < 1 or args.eval_batches < 1:  # the parser refuses them; callers may build args themselves
        raise UsageError("--calib-batches and --eval-batches must be at least 1")
    if args.json:
        require_output(args.json, "--json")
    if args.plot:
        require_matplotlib()
        require_output(args.plot, "--plot")
    qm, _model, inputs = prepared(args.model, args.checkpoint, default_calibration(args))
    if not inputs:
        raise UsageError(f"{printable(args.model)} gives no example inputs")
    calib = [b[0] for b in random_batches(inputs, args.calib_batches, seed=1)]
    evaluation = [b[0] for b in random_batches(inputs, args.eval_batches, seed=2)]
    variants = QUICK_VARIANTS if args.variants == "quick" else DEFAULT_VARIANTS
    report = vendor_sweep(qm, calib, evaluation, variants=variants, backends=backends,
                          weight_bits=args.weight_bits, progress=tty())
    print(printable(report.table(), keep="\n"))
    if args.json:
        write_text(args.json, report.to_json())
    if args.plot:
        report.plot(args.plot)  # written atomically by VendorReport.plot
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
    """``qtrim report``: curriculum and weight plots, graph, QDQ export and per-layer SQNR, into a folder.

    Every argument (target, backends, curriculum, output folder and the files in it) is checked, and
    MODEL loaded and prepared, before the first file is written; each file is written atomically.
    """
    import qtrim_fx
    from qtrim_fx.onnx.export_model import export_onnx
    from qtrim_fx.tools.graph_view import write_graph
    from qtrim_fx.tools.plots import plot_curriculum
    from qtrim_fx.verification.run import BACKENDS, verify

    check_target(args.target)
    require_matplotlib()
    backends = parse_backends(args.backends, BACKENDS)
    try:
        curriculum = qtrim_fx.Curriculum(args.warmup, args.ramp_end, args.horizon)
        pruner = qtrim_fx.ReversePruner(p_clip=args.p_clip, every=args.every)
    except ValueError as e:
        raise UsageError(one_line(e)) from None
    out = require_output_folder(args.output, "-o")
    for name in REPORT_FILES:
        require_output(out / name, "-o")
    written = []
    with stages("qtrim report", 7) as bar:
        qm, model, inputs = prepared(args.model, args.checkpoint, 0, bar)
        if not inputs:
            raise UsageError(f"{printable(args.model)} gives no example inputs")
        out.mkdir(parents=True, exist_ok=True)
        stage(bar, "curriculum plot")
        written.append(plot_curriculum(curriculum, args.epochs, out / "curriculum.png", pins=pruner))
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
        report = verify(onnx_path, model.eval(), batches, backends=backends, per_layer=True)
        write_json(out / "verify.json", report.to_dict())
        written.append(out / "verify.json")
        stage(bar, "per-layer plot")
    print(map_strings(report, printable).table())
    print()
    for p in written:
        print(f"wrote {p}")
    plot_layers(report, out)
    return EXIT_PROBLEMS if report.failures() else EXIT_OK
