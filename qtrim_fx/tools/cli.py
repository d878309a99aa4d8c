"""The ``qtrim`` command line.

    qtrim inspect MODEL [--calibrate N] [--graph out.html|out.svg|out.dot] [--json sites.json] [--target T]
    qtrim export MODEL -o out.onnx --target T [--checkpoint ckpt.pt] [--calibrate N] [--opset 21]
    qtrim check out.onnx --target T [--json violations.json]
    qtrim verify out.onnx --reference MODEL|fp32.onnx [--backends onnxruntime,openvino] [--json report.json]
                 [--per-layer] [--min-sqnr DB|off] [--min-top1 F|off] [--plots DIR]
    qtrim report MODEL -o DIR          curriculum, weight distributions before/after a reverse-pruning pin,
                                       graph, QDQ export and per-layer SQNR of a model, as PNG/HTML/JSON

MODEL is a built-in name (``tiny_convnet``, ``cifar_resnet18``, ``tv_resnet18`` ...),
``package.module:factory`` or ``path/file.py:factory``; a factory returns a module or
``(module, example_inputs)``.

Exit codes: 0 ok, 1 a check/verify found problems, 2 usage errors (bad MODEL, missing file, unknown
target, bad option; one line on stderr), 3 an unexpected failure (one line; ``--traceback`` shows where).
Progress bars appear on stderr when it is a terminal. What libraries print on stderr while a command
runs (warnings, log lines, FX tracebacks) is held back and summarized after a result, dropped after
an error (:mod:`qtrim_fx.tools.cli_streams`); ``--verbose`` shows it as it comes.

This module holds the parser and :func:`main`; the commands live in
:mod:`qtrim_fx.tools.cli_commands`, what they share in :mod:`qtrim_fx.tools.cli_common`.
"""


from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from qtrim_fx import __version__
from qtrim_fx.tools.cli_commands import cmd_check as _cmd_check
from qtrim_fx.tools.cli_commands import cmd_export as _cmd_export
from qtrim_fx.tools.cli_commands import cmd_inspect as _cmd_inspect
from qtrim_fx.tools.cli_commands import cmd_report as _cmd_report
from qtrim_fx.tools.cli_commands import cmd_vendors as _cmd_vendors
from qtrim_fx.tools.cli_commands import cmd_verify as _cmd_verify
from qtrim_fx.tools.cli_common import (
    CHECKPOINT_HELP,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PROBLEMS,  # noqa: F401  (not used here; kept importable from qtrim_fx.tools.cli)
    EXIT_USAGE,
    MODEL_HELP,
    OFF,
    UsageError,
    load_model,
    one_line,
)
from qtrim_fx.tools.cli_streams import held_stderr

__all__ = ["UsageError", "build_parser", "load_model", "main"]


# --- parser --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) that point at ``--help``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {n}")
        return n

    parse.__name__ = "count"
    return parse


def _finite(text: str) -> float:
    """An argparse type: a finite number (no nan, no inf)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return x


def _threshold(low: float | None = None, high: float | None = None) -> Callable[[str], float | str]:
    """An argparse type: a finite number (in [low, high] when given), or ``off``."""

    def parse(text: str) -> float | str:
        if text.strip().lower() in ("off", "none"):
            return OFF
        x = _finite(text)
        if (low is not None and x < low) or (high is not None and x > high):
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}] (or off), got {text!r}")
        return x

    parse.__name__ = "threshold"
    return parse


def _sub(sub: Any, name: str, help: str, description: str, example: str) -> argparse.ArgumentParser:
    """Add the sub-command ``name`` with its help, description and an example in the epilog."""
    return sub.add_parser(name, help=help, description=description, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _model_options(p: argparse.ArgumentParser, calibrate_default: str) -> None:
    """The MODEL argument and the ``--checkpoint`` / ``--calibrate`` options of the model commands."""
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--checkpoint", metavar="FILE", help=CHECKPOINT_HELP)
    p.add_argument("--calibrate", type=_count(0), metavar="N",
                   help=f"calibrate on the example inputs + N random batches ({calibrate_default})")


def _add_inspect(sub: Any) -> None:
    """``qtrim inspect``: prepare MODEL and print its sites."""
    p = _sub(sub, "inspect", "prepare MODEL and print its quantization sites",
             "Prepare MODEL (insert observer + blend-quant sites) and print one row per site.",
             "qtrim inspect tiny_convnet --calibrate 2 --graph tiny.html")
    _model_options(p, "default: none, so no scales are shown")
    p.add_argument("--graph", action="append", metavar="PATH",
                   help="draw the prepared graph, sites highlighted: .html (page with sites table), .svg or "
                        ".dot; repeat for several files")
    p.add_argument("--json", metavar="PATH", help="write the sites table as JSON")
    p.add_argument("--target", metavar="T",
                   help="also note which sites the target drops and why: onnxruntime, tensorrt, openvino, qnn, "
                        "npu (needs --calibrate or a --checkpoint)")
    p.set_defaults(handler=_cmd_inspect)


def _add_export(sub: Any) -> None:
    """``qtrim export``: write a QDQ ONNX file for a target."""
    p = _sub(sub, "export", "prepare (or load) MODEL and write a QDQ ONNX file",
             "Fold BatchNorm, lower every site to QuantizeLinear/DequantizeLinear for the target and write ONNX.",
             "qtrim export tiny_convnet --calibrate 4 -o tiny.qdq.onnx --target onnxruntime")
    _model_options(p, "default: 4, or 0 with a --checkpoint that holds statistics")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.add_argument("--target", default="onnxruntime", help="onnxruntime (default), onnxruntime_avx2, tensorrt, openvino, qnn, npu")
    p.add_argument("--opset", type=_count(1), help="override the target's opset (21 for INT4)")
    p.set_defaults(handler=_cmd_export)


def _add_check(sub: Any) -> None:
    """``qtrim check``: list a target's rule violations in an ONNX file."""
    p = _sub(sub, "check", "list violations of a target's rules in an ONNX file",
             "List every rule of the target that a QDQ ONNX file breaks (exit 1 if any).",
             "qtrim check tiny.qdq.onnx --target tensorrt")
    p.add_argument("onnx", metavar="ONNX", help="the .onnx file (ours or made by another tool)")
    p.add_argument("--target", help="onnxruntime, tensorrt, openvino, qnn, npu (default: the target a qtrim_fx file "
                                    "was written for, else onnxruntime)")
    p.add_argument("--json", metavar="PATH", help="write the violations as JSON")
    p.set_defaults(handler=_cmd_check)


def _add_verify(sub: Any) -> None:
    """``qtrim verify``: compare an ONNX file on several runtimes with the reference."""
    p = _sub(sub, "verify", "run an ONNX file on several runtimes against the reference",
             "Run the ONNX file on each backend and the reference on the same random batches; print MSE, "
             "SQNR, max|err|, cosine and top-1 per backend, side by side, and between backend pairs.",
             "qtrim verify tiny.qdq.onnx --reference tiny_convnet --backends onnxruntime,openvino --json r.json")
    p.add_argument("onnx", metavar="ONNX", help="the model to verify (usually the QDQ export)")
    p.add_argument("--reference", required=True, metavar="MODEL|FP32.onnx",
                   help=f"the FP32 reference: {MODEL_HELP}, or an FP32 .onnx file (a MODEL is built twice to check "
                        "that it is deterministic: seed a factory's random init, or pass --checkpoint)")
    p.add_argument("--checkpoint", metavar="FILE", help=f"load this into the MODEL reference: {CHECKPOINT_HELP}")
    p.add_argument("--backends", default="onnxruntime,onnxruntime-noopt,openvino",
                   help="comma-separated: onnxruntime, onnxruntime-noopt, openvino, onnx-reference, qnn")
    p.add_argument("--batches", type=_count(1), default=4, help="number of input batches (default 4)")
    p.add_argument("--batch-size", type=_count(1), default=2,
                   help="batch size for an ONNX reference's symbolic batch dimension (default 2)")
    p.add_argument("--per-layer", action="store_true", help="also compare intermediate tensors per layer")
    p.add_argument("--qnn-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the qnn backend (repeatable): soc_model=60, htp_performance_mode=burst, "
                        "strict=0 (allow CPU fallback; strict, the default, fails on any node the HTP cannot take)")
    p.add_argument("--min-sqnr", type=_threshold(), metavar="DB|off",
                   help="fail (exit 1) below this output SQNR in dB (default 20; off: no SQNR threshold)")
    p.add_argument("--min-top1", type=_threshold(0.0, 1.0), metavar="F|off",
                   help="fail (exit 1) below this top-1 agreement, 0..1 (default 0.9; off: no top-1 threshold)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON (every figure of the table)")
    p.add_argument("--markdown", metavar="PATH", help="write the report as Markdown")
    p.add_argument("--plots", metavar="DIR", help="write DIR/layer_sqnr.png (implies --per-layer)")
    p.set_defaults(handler=_cmd_verify)


def _add_report(sub: Any) -> None:
    """``qtrim report``: plots and files showing what Quant-Trim does to MODEL."""
    p = _sub(sub, "report", "plots and files showing what Quant-Trim does to MODEL",
             "Write into DIR: curriculum.png (λ_t and pin epochs), weights.png (weight histograms before/after "
             "one reverse-pruning pin), graph.html (prepared graph, sites highlighted), model.qdq.onnx, "
             "verify.json and layer_sqnr.png (per-layer SQNR vs the FP32 model).",
             "qtrim report tiny_convnet -o report/")
    _model_options(p, "default: 4")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--target", default="onnxruntime", help="export target (default onnxruntime)")
    p.add_argument("--backends", default="onnxruntime,openvino", help="verify backends (comma-separated)")
    p.add_argument("--epochs", type=_count(1), default=80, help="curriculum plot length (default 80)")
    p.add_argument("--warmup", type=_finite, default=10, help="curriculum E_w (default 10)")
    p.add_argument("--ramp-end", type=_finite, default=50, help="curriculum E_f (default 50)")
    p.add_argument("--horizon", type=_finite, default=20, help="curriculum H (default 20)")
    p.add_argument("--p-clip", type=_finite, default=0.95, help="reverse-pruning quantile (default 0.95)")
    p.add_argument("--every", type=_count(1), default=5, help="epochs between pins (default 5)")
    p.set_defaults(handler=_cmd_report, calibrate=4)


def _add_vendors(sub: Any) -> None:
    """``qtrim vendors``: vendor-style quantization variants and their spread."""
    p = _sub(sub, "vendors", "quantize MODEL's float graph like vendor tools do and measure the spread",
             "Quantize the checkpoint's FP32 graph with independent tools (ONNX Runtime quantize_static: "
             "MinMax / Percentile / Entropy, per-tensor / per-channel, u8 / s8, 32 / 256 calibration "
             "samples) plus our embedded-scale export; run each on ONNX Runtime and OpenVINO; print top-1 "
             "(agreement with FP32 without labels) and logit MSE per variant and their spread.",
             "qtrim vendors tiny_convnet --variants quick --json vendors.json --plot vendors.png")
    _model_options(p, "default: 4, or 0 with a --checkpoint that holds statistics")
    p.add_argument("--variants", choices=("quick", "full"), default="full", help="variant matrix (default full)")
    p.add_argument("--backends", default="onnxruntime,openvino", help="comma-separated runtimes")
    p.add_argument("--weight-bits", type=int, choices=(4, 8), default=8, help="weight bits (default 8)")
    p.add_argument("--calib-batches", type=_count(1), default=8, help="random calibration batches (default 8)")
    p.add_argument("--eval-batches", type=_count(1), default=8, help="random evaluation batches (default 8)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--plot", metavar="PNG", help="write the top-1 matrix as a PNG")
    p.set_defaults(handler=_cmd_vendors)


def build_parser() -> argparse.ArgumentParser:
    """The ``qtrim`` argument parser (one sub-command per action)."""
    parser = _Parser(
        prog="qtrim",
        description="Quant-Trim for PyTorch: prepare, inspect, export, check and verify quantized models.",
        epilog="exit codes: 0 ok, 1 problems found, 2 usage error, 3 unexpected failure",
    )
    parser.add_argument("--version", action="version", version=f"qtrim_fx {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of a failure")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show what libraries print on stderr (warnings, log lines) as it comes; by default "
                             "it is held back: one line per kind of warning after a result, nothing after an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_inspect, _add_export, _add_check, _add_verify, _add_report, _add_vendors):
        add(sub)
    return parser


def _user_error(e: Exception) -> bool:
    """Whether an exception a command raised is about the user's input (exit 2) rather than a failure (3)."""
    from qtrim_fx.core import errors

    # qtrim's own errors about the user's input (not VerifyError or internal contract errors)
    user_errors = (errors.ConfigError, errors.CaptureError, errors.CheckpointError, errors.ProfileError,
                   errors.ExportError, errors.OutputPathError)
    return isinstance(e, (*user_errors, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError))


def _run(handler: Callable[[argparse.Namespace], Any], args: argparse.Namespace, debug: bool) -> tuple[int, str]:
    """``(exit code, error line or "")`` of one command."""
    try:
        return int(handler(args) or 0), ""
    except UsageError as e:
        return EXIT_USAGE, f"qtrim: error: {one_line(e)}"
    except KeyboardInterrupt:
        return 130, "qtrim: interrupted"
    except Exception as e:
        if debug:
            raise
        usage = _user_error(e)
        return (EXIT_USAGE if usage else EXIT_FAILURE), (f"qtrim: error: {type(e).__name__}: {one_line(e)}"
                                                         + ("" if usage else " (run with --traceback for details)"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qtrim`` command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_OK
    debug = args.traceback or bool(os.environ.get("QTRIM_TRACEBACK"))
    with held_stderr(hold=not (debug or args.verbose)) as held:
        code, error = _run(handler, args, debug)
    # after an error its line alone (the one-line promise); after a result, what was held back
    lines = [error] if error else held.summary()
    if lines:
        print("\n".join(lines), file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
