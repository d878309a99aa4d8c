"""Text and Markdown rendering of a verify report (tables, side-by-side figures, worst layers).

Takes the report objects of :mod:`qtrim_fx.verification.report` by duck typing, so it imports nothing
of that module (which imports this one).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["format_cosine", "format_db", "format_pct", "format_sci", "render"]


def format_db(x: float) -> str:
    """A dB figure as the report prints it: two decimals, ``inf``, ``-inf`` or ``nan``."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.2f}"


def format_pct(x: float | None) -> str:
    """A fraction as a percentage with two decimals; ``-`` for None."""
    return "-" if x is None else f"{100.0 * x:.2f}%"


def format_sci(x: float) -> str:
    """A figure in scientific notation (MSE, max error), or ``nan``."""
    return "nan" if math.isnan(x) else f"{x:.3e}"


def format_cosine(x: float) -> str:
    """A cosine similarity with six decimals, or ``nan``."""
    return "nan" if math.isnan(x) else f"{x:.6f}"


def _metric_cells(m: Any) -> list[str]:
    return [
        m.output,
        "x".join(map(str, m.shape)),
        format_sci(m.mse),
        format_db(m.sqnr_db),
        format_sci(m.max_abs_err),
        format_cosine(m.cosine),
        format_pct(m.top1),
    ]


def _grid(headers: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        esc = lambda c: c.replace("|", "\\|")  # noqa: E731
        lines = [
            "| " + " | ".join(esc(h) for h in headers) + " |",
            "|" + "|".join("---" for _ in headers) + "|",
        ]
        return lines + ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def _heading(text: str, markdown: bool) -> list[str]:
    return ["", f"## {text}", ""] if markdown else ["", text]


def _render_backends(report: Any, md: bool) -> list[str]:
    headers = [
        "backend",
        "status",
        "output",
        "shape",
        "MSE",
        "SQNR dB",
        "max|err|",
        "cosine",
        "top-1",
        "time ms",
    ]
    rows = []
    for b in report.backends:
        if b.outputs:
            rows += [[b.backend, b.status, *_metric_cells(o), f"{1000.0 * b.seconds:.2f}"] for o in b.outputs]
        else:
            rows.append([b.backend, b.status] + ["-"] * (len(headers) - 2))
    lines = _heading("Backends vs reference", md) + _grid(headers, rows, md)
    lines += ([""] if md else []) + ["Notes:" if not md else "**Notes**", *([""] if md else [])]
    for b in report.backends:
        lines.append(f"- {b.backend} ({b.status}): {b.info if b.status == 'ok' else b.message}")
    return lines


def _render_pairs(report: Any, md: bool) -> list[str]:
    lines = _heading("Backend pairs (first backend taken as reference)", md)
    if not report.pairs:
        return [*lines, "(fewer than two backends ran)"]
    headers = ["backend a", "backend b", "output", "shape", "MSE", "SQNR dB", "max|err|", "cosine", "top-1"]
    rows = [[p.a, p.b, *_metric_cells(o)] for p in report.pairs for o in p.outputs]
    return lines + _grid(headers, rows, md)


def _render_layers(pl: Any, md: bool) -> list[str]:
    lines = _heading(f"Per layer ({pl.backend}, model vs FP32 reference ONNX): {pl.status}", md)
    lines += [pl.message, *([""] if md else [])]
    if pl.layers:
        headers = ["#", "layer", "op", "matched by", "SQNR dB", "MSE", "max|err|", "cosine"]
        rows = [
            [
                str(i),
                la.layer,
                la.op_type,
                la.matched_by,
                format_db(la.sqnr_db),
                format_sci(la.mse),
                format_sci(la.max_abs_err),
                format_cosine(la.cosine),
            ]
            for i, la in enumerate(pl.layers)
        ]
        lines += _grid(headers, rows, md)
    by_name = {la.layer: la for la in pl.layers}
    if pl.worst:
        worst = ", ".join(f"{n} ({format_db(by_name[n].sqnr_db)} dB)" for n in pl.worst)
        lines += [*([""] if md else []), f"Worst layers: {worst}"]
    lines.append(
        f"Matched: {len(pl.layers)}; unmatched: {len(pl.unmatched)}"
        + (f" ({', '.join(pl.unmatched)})" if pl.unmatched else "")
    )
    return lines


def render(report: Any, markdown: bool) -> list[str]:
    title = f"qtrim verify: {report.model}"
    lines = [f"# {title}" if markdown else title]
    lines += [
        "",
        f"Reference: {report.reference}; {report.num_batches} batch(es), {report.num_samples} sample(s); "
        f"outputs: {', '.join(report.output_names)}",
    ]
    lines += _render_backends(report, markdown) + _render_pairs(report, markdown)
    if report.per_layer is not None:
        lines += _render_layers(report.per_layer, markdown)
    return lines
