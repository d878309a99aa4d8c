"""``qtrim verify``: an ONNX file on several runtimes against the reference, and what it shares with ``report``.

Split from :mod:`qtrim_fx.tools.cli_commands` (which re-exports :func:`cmd_verify`); see there for
the conventions. Output and layer names come from the verified file: they are shown with control
characters escaped (:func:`~qtrim_fx.tools.sanitize.printable`) and written into Markdown escaped
(:func:`~qtrim_fx.tools.sanitize.markdown`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qtrim_fx.tools.cli_common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    OFF,
    UsageError,
    load_model,
    one_line,
    prepared,
    random_batches,
    require_file,
    require_matplotlib,
    require_output,
    require_output_folder,
    stage,
    stages,
    warn,
    write_json,
    write_text,
)
from qtrim_fx.tools.sanitize import map_strings, markdown, printable

__all__ = [
    "check_deterministic",
    "cmd_verify",
    "onnx_batches",
    "parse_backends",
    "plot_layers",
    "side_by_side",
]


def onnx_batches(path: str, n: int, batch_size: int) -> list[tuple]:
    """Random batches for the inputs of an ONNX file: :func:`qtrim_fx.verification.run.random_inputs`
    (symbolic dimensions take ``batch_size``; a batch above its size cap is refused, not allocated)."""
    from qtrim_fx.verification.run import random_inputs

    return random_inputs(path, n, batch_size)


def _outputs(model: Any, inputs: tuple) -> list[Any]:
    """The tensors ``model`` returns on ``inputs`` (eval mode, no grad; its training flag restored)."""
    import torch

    training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(*inputs)
    finally:
        model.train(training)
    flat, todo = [], [out]
    while todo:
        x = todo.pop(0)
        if isinstance(x, torch.Tensor):
            flat.append(x)
        elif isinstance(x, (list, tuple)):
            todo[:0] = list(x)
        elif isinstance(x, dict):
            todo[:0] = list(x.values())
    return flat


def check_deterministic(spec: str, model: Any, inputs: tuple) -> bool:
    """Build MODEL again and compare both on ``inputs``; warn (one line) when they differ.

    A factory with an unseeded random init builds another model on every call, so the reference
    ``verify`` compares with is not the model the file was exported from (a file can then look
    broken, or fine, for no reason of its own).

    Returns:
        Whether both builds gave the same outputs (True too when they could not be compared).
    """
    import torch

    try:
        other, _ = load_model(spec)
        a, b = _outputs(model, inputs), _outputs(other, inputs)
    except Exception:  # a model that does not run is reported by verify itself
        return True
    same = len(a) == len(b) and all(
        x.shape == y.shape and torch.allclose(x.float(), y.float(), rtol=1e-5, atol=1e-6, equal_nan=True)
        for x, y in zip(a, b, strict=False))
    if not same:
        diffs = [float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=False)
                 if x.shape == y.shape and x.numel()]
        how = f" (max |difference| {max(diffs):.3g})" if diffs else ""
        warn(f"--reference {printable(spec)} is not deterministic: two builds give different outputs on the same "
             f"batch{how}, so the reference is probably not the model the file was exported from; seed the "
             "factory (torch.manual_seed) or pass --checkpoint")
    return same


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
        raise UsageError(f"{printable(args.reference)} gives no example inputs")
    if not args.checkpoint:  # a checkpoint fixes the weights
        check_deterministic(args.reference, model, inputs)
    return model.eval(), [inputs, *random_batches(inputs, args.batches - 1, seed=1)]


def side_by_side(report: Any) -> list[str]:
    """The backends' figures as columns, one block per output (the same figures as the full table).

    Args:
        report: a :class:`~qtrim_fx.verification.report.VerifyReport`.

    Returns:
        The text lines (none when fewer than two backends ran).
    """
    from qtrim_fx.verification.report import format_cosine, format_db, format_pct, format_sci

    ran = [b for b in report.backends if b.status == "ok"]
    if len(ran) < 2:
        return []
    lines = []
    for k, name in enumerate(report.output_names):
        metrics = [b.outputs[k] for b in ran]
        lines += ["", f"Side by side, output '{printable(name)}': each backend vs the reference"]
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


def parse_backends(text: str, known: tuple[str, ...], option: str = "--backends") -> tuple[str, ...]:
    """The comma-separated backend names of ``text``; :class:`UsageError` for an unknown one or none."""
    backends = tuple(dict.fromkeys(b.strip() for b in text.split(",") if b.strip()))
    unknown = [b for b in backends if b not in known]
    if unknown or not backends:
        shown = ", ".join(repr(b) for b in unknown) or "(none given)"
        raise UsageError(f"{option}: unknown backend(s) {shown}; known: {', '.join(known)}")
    return backends


def _verify_backends(args: argparse.Namespace) -> tuple[str, ...]:
    """Check ``verify``'s options and output paths before anything slow runs; the backends asked for."""
    from qtrim_fx.verification.run import BACKENDS

    require_file(args.onnx, "file")
    backends = parse_backends(args.backends, BACKENDS)
    if args.batches < 1 or args.batch_size < 1:  # the parser refuses them; callers may build args themselves
        raise UsageError("--batches and --batch-size must be at least 1")
    for value, option in ((args.json, "--json"), (args.markdown, "--markdown")):
        if value:
            require_output(value, option)
    if args.plots:
        require_matplotlib()
        require_output(require_output_folder(args.plots, "--plots") / "layer_sqnr.png", "--plots")
    _qnn_options(args)
    return backends


def _qnn_options(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """``--qnn-option KEY=VALUE ...`` as verify's ``backend_options``."""
    given = getattr(args, "qnn_option", None) or []
    bad = [o for o in given if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise UsageError(f"--qnn-option takes KEY=VALUE (e.g. soc_model=60), got {bad[0]!r}")
    options = dict(o.split("=", 1) for o in given)
    return {"qnn": {k.strip(): v.strip() for k, v in options.items()}} if options else {}


def _thresholds(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """``(min SQNR dB, min top-1)`` for ``verify``: the option's value, verify's default, or None for ``off``."""
    from qtrim_fx.verification.report import DEFAULT_MIN_SQNR_DB, DEFAULT_MIN_TOP1, validate_thresholds

    def pick(value: Any, default: float) -> float | None:
        return default if value is None else (None if value == OFF else float(value))

    sqnr, top1 = pick(args.min_sqnr, DEFAULT_MIN_SQNR_DB), pick(args.min_top1, DEFAULT_MIN_TOP1)
    try:
        validate_thresholds(sqnr, top1)
    except ValueError as e:
        raise UsageError(one_line(e).replace("min_sqnr_db=", "--min-sqnr ").replace("min_top1=", "--min-top1 ")
                         .replace("None", "off")) from None
    return sqnr, top1


def cmd_verify(args: argparse.Namespace) -> int:
    """``qtrim verify``: run an ONNX file on several back ends against the reference (exit 1 on failures)."""
    from qtrim_fx.verification.run import verify

    backends = _verify_backends(args)
    min_sqnr, min_top1 = _thresholds(args)
    per_layer = args.per_layer or bool(args.plots)
    with stages("qtrim verify", 2 + bool(args.checkpoint)) as bar:
        reference, batches = _reference(args, bar)
        stage(bar, f"run {', '.join(backends)}" + (" + per layer" if per_layer else ""))
        report = verify(args.onnx, reference, batches, backends=backends, per_layer=per_layer,
                        min_sqnr_db=min_sqnr, min_top1=min_top1, backend_options=_qnn_options(args))
    failures = report.failures()
    shown = map_strings(report, printable)  # output and layer names come from the file
    print(shown.table())
    print("\n".join(side_by_side(shown)))
    print()
    print("\n".join(f"FAIL: {printable(f)}" for f in failures) if failures else "verify: ok")
    if args.json:
        write_json(args.json, {**report.to_dict(), "failures": failures})
    if args.markdown:
        write_text(args.markdown, map_strings(report, markdown).to_markdown())
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
        warn(f"no per-layer plot: {one_line(e)}")
        return None
    print(f"wrote {path}")
    return path
