"""The ``qtrim`` command line.

    qtrim inspect MODEL                                  sites table of the prepared model
    qtrim export MODEL -o out.onnx --target T [--checkpoint ckpt.pt] [--calibrate N]
    qtrim check out.onnx --target T                      rule violations of a QDQ file
    qtrim verify out.onnx --reference MODEL [--backends onnxruntime,openvino] [--json report.json]

MODEL is a built-in name (``tiny_convnet``, ``cifar_resnet18``, ``tv_resnet18`` ...),
``package.module:factory`` or ``path/file.py:factory``; a factory returns a module or
``(module, example_inputs)``.

Exit codes: 0 ok, 1 a check/verify found problems, 2 usage errors.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__

__all__ = ["build_parser", "load_model", "main"]


class UsageError(Exception):
    """A bad command line: printed as one line, exit code 2."""


def load_model(spec: str) -> tuple[Any, tuple]:
    """Resolve a MODEL spec to ``(module, example_inputs)`` (example inputs may be ``()``)."""
    import torch

    if ":" not in spec:
        from models import MODELS, get_model

        if spec not in MODELS:
            raise UsageError(f"unknown model {spec!r}: use a built-in name ({', '.join(sorted(MODELS))}), "
                             "package.module:factory or path/file.py:factory")
        return get_model(spec)
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"model file {where!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
        sys.modules[path.stem] = module
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UsageError(f"cannot import {where!r}: {e}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"{where!r} has no callable {name!r}")
    out = factory()
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module):
        inputs = out[1] if isinstance(out[1], tuple) else (out[1],)
        return out[0], inputs
    if isinstance(out, torch.nn.Module):
        return out, ()
    raise UsageError(f"factory {spec!r} must return an nn.Module or (module, example_inputs)")


def _prepared(spec: str, checkpoint: str | None, calibrate: int) -> tuple[Any, tuple]:
    import torch

    import qtrim_fx

    model, inputs = load_model(spec)
    qm = qtrim_fx.prepare(model, inputs or None)
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise UsageError(f"checkpoint {checkpoint!r} does not exist")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        try:
            qm.load_state_dict(state)
        except RuntimeError as e:
            raise UsageError(f"checkpoint {checkpoint!r} does not fit {spec}: {str(e).splitlines()[0]}") from None
    if calibrate:
        if not inputs:
            raise UsageError(f"--calibrate needs example inputs; {spec} returned none")
        gen = torch.Generator().manual_seed(0)
        batches = [tuple(torch.randn(t.shape, generator=gen) * t.std() + t.mean() if t.is_floating_point() else t
                         for t in inputs) for _ in range(calibrate)]
        qtrim_fx.calibrate(qm, [inputs, *batches], progress=sys.stderr.isatty())
    return qm, inputs


def _cmd_inspect(args: argparse.Namespace) -> int:
    import qtrim_fx

    qm, _ = _prepared(args.model, args.checkpoint, args.calibrate)
    print(qtrim_fx.inspect(qm).table())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import qtrim_fx
    from qtrim_fx.export import export_onnx
    from qtrim_fx.onnx.profiles import get_profile, profile_names

    try:
        get_profile(args.target)
    except Exception:
        raise UsageError(f"unknown target {args.target!r}; known: {', '.join(profile_names())}") from None
    qm, inputs = _prepared(args.model, args.checkpoint, args.calibrate)
    if not inputs:
        raise UsageError(f"{args.model} gives no example inputs to trace with")
    qtrim_fx.set_blend(qm, 1.0)
    export_onnx(qm, inputs, args.output, args.target, opset=args.opset)
    print(f"wrote {args.output} (target {args.target})")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from qtrim_fx.onnx.check import check
    from qtrim_fx.onnx.profiles import get_profile, profile_names

    if not Path(args.onnx).is_file():
        raise UsageError(f"file {args.onnx!r} does not exist")
    try:
        get_profile(args.target)
    except Exception:
        raise UsageError(f"unknown target {args.target!r}; known: {', '.join(profile_names())}") from None
    problems = check(args.onnx, args.target)
    for v in problems:
        print(f"{v.rule}: {v.node}: {v.message}")
    print(f"{len(problems)} violation(s) of target {args.target!r} in {args.onnx}")
    return 1 if problems else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from qtrim_fx.verify import verify

    if not Path(args.onnx).is_file():
        raise UsageError(f"file {args.onnx!r} does not exist")
    model, inputs = load_model(args.reference)
    if not inputs:
        raise UsageError(f"{args.reference} gives no example inputs")
    gen = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randn(t.shape, generator=gen) if t.is_floating_point() else t for t in inputs)
               for _ in range(args.batches)]
    report = verify(args.onnx, model.eval(), batches, backends=tuple(args.backends.split(",")))
    print(report.table())
    if args.json:
        report.to_json(args.json)
    if args.markdown:
        report.to_markdown(args.markdown)
    return 0 if report.ok() else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qtrim",
        description="Quant-Trim for PyTorch: prepare, inspect, export and verify quantized models.",
    )
    parser.add_argument("--version", action="version", version=f"qtrim_fx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="prepare MODEL and print its quantization sites")
    p.add_argument("model", help="built-in name, package.module:factory or path/file.py:factory")
    p.add_argument("--checkpoint", help="state_dict of the prepared model (torch.save)")
    p.add_argument("--calibrate", type=int, default=0, metavar="N", help="calibrate on N random batches")
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("export", help="prepare (or load) MODEL and write a QDQ ONNX file")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.add_argument("--target", default="onnxruntime", help="onnxruntime, tensorrt, openvino, qnn, npu")
    p.add_argument("--checkpoint", help="state_dict of a trained prepared model")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="calibrate on the example inputs + N random batches (when no checkpoint)")
    p.add_argument("--opset", type=int, help="override the target's opset (21 for INT4)")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("check", help="list violations of a target's rules in an ONNX file")
    p.add_argument("onnx")
    p.add_argument("--target", default="onnxruntime")
    p.set_defaults(handler=_cmd_check)

    p = sub.add_parser("verify", help="run an ONNX file on several runtimes against the torch reference")
    p.add_argument("onnx")
    p.add_argument("--reference", required=True, help="MODEL spec of the FP32 reference")
    p.add_argument("--backends", default="onnxruntime,onnxruntime-noopt,openvino")
    p.add_argument("--batches", type=int, default=4, help="number of random input batches")
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--markdown", help="write the report as Markdown")
    p.set_defaults(handler=_cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return int(handler(args) or 0)
    except UsageError as e:
        print(f"qtrim: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
