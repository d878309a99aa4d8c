"""The result of :func:`qtrim_fx.verify`: per-backend, pairwise and per-layer metrics, and their rendering.

``VerifyReport.table()`` / ``to_markdown()`` / ``to_json()`` render what :mod:`qtrim_fx.verify` measured;
the CLI (``qtrim verify``) prints the same text.

Pass/fail: :meth:`VerifyReport.failures` / :meth:`VerifyReport.ok` judge every output of every backend
against the report's thresholds, by default :data:`DEFAULT_MIN_SQNR_DB` (20 dB: error power at most 1 %
of the signal's) and :data:`DEFAULT_MIN_TOP1` (90 % of rows with the reference's argmax, 2-D outputs
only). ``verify(..., min_sqnr_db=..., min_top1=...)`` sets them (``None`` turns one off); arguments
of ``failures``/``ok`` override them for one call.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

from qtrim_fx.core.errors import ConfigError
from qtrim_fx.core.fileio import write_text_atomically
from qtrim_fx.verification.render import format_cosine, format_db, format_pct, format_sci, render

__all__ = [
    "DEFAULT_MIN_SQNR_DB",
    "DEFAULT_MIN_TOP1",
    "WORST_LAYERS",
    "BackendResult",
    "LayerMetrics",
    "OutputMetrics",
    "PairResult",
    "PerLayerReport",
    "VerifyReport",
    "format_cosine",
    "format_db",
    "format_pct",
    "format_sci",
    "json_safe",
    "validate_thresholds",
]

WORST_LAYERS = 5
#: default lowest SQNR (dB) of every output: the error carries at most 1 % of the signal's power.
DEFAULT_MIN_SQNR_DB = 20.0
#: default lowest top-1 agreement (fraction of rows) of every 2-D ``(batch, classes)`` output.
DEFAULT_MIN_TOP1 = 0.9


def validate_thresholds(min_sqnr_db: float | None, min_top1: float | None) -> None:
    """Refuse thresholds that cannot be met or compared: NaN, ±inf, a top-1 outside [0, 1].

    Args:
        min_sqnr_db: SQNR threshold in dB, or None.
        min_top1: top-1 threshold as a fraction, or None.

    Raises:
        ConfigError: naming the bad threshold and what to pass instead.
    """
    if min_sqnr_db is not None and not math.isfinite(_as_float(min_sqnr_db)):
        raise ConfigError(f"min_sqnr_db={min_sqnr_db!r} must be a finite number of dB (e.g. 20), or None to "
                          "turn the SQNR threshold off")
    if min_top1 is not None and not 0.0 <= _as_float(min_top1) <= 1.0:
        raise ConfigError(f"min_top1={min_top1!r} must be a fraction in [0, 1], e.g. 0.99 for 99 %, or None to "
                          "turn the top-1 threshold off")


def _as_float(x: object) -> float:
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


# --- report --------------------------------------------------------------------------------------------


@dataclass
class OutputMetrics:
    """Agreement of one output with its reference.

    Attributes:
        output: output name (of the verified ONNX model).
        shape: shape of the output for the first batch.
        mse: mean squared error.
        sqnr_db: 10 log10(sum ref^2 / sum err^2); inf when identical.
        max_abs_err: largest absolute difference.
        cosine: cosine similarity of the flattened outputs.
        top1: share of rows with the same argmax (2-D outputs only, else None), in [0, 1].
    """

    output: str
    shape: list[int]
    mse: float
    sqnr_db: float
    max_abs_err: float
    cosine: float
    top1: float | None = None


@dataclass
class BackendResult:
    """One backend against the reference.

    Attributes:
        backend: backend name.
        status: ``"ok"``, ``"skipped"`` (not available here; ``message`` says how to install) or
            ``"error"`` (it failed; ``message`` says why).
        message: reason for a skip or an error.
        info: how it ran (versions, providers, node placement).
        seconds: wall time of the inference calls.
        outputs: metrics per output (empty unless ok).
        ep_nodes: nodes per execution provider where the runtime reports placement (``qnn``).
    """

    backend: str
    status: str
    message: str = ""
    info: str = ""
    seconds: float = 0.0
    outputs: list[OutputMetrics] = field(default_factory=list)
    ep_nodes: dict[str, int] = field(default_factory=dict)


@dataclass
class PairResult:
    """Two backends against each other (``a`` taken as the reference).

    Attributes:
        a: first backend.
        b: second backend.
        outputs: metrics per output.
    """

    a: str
    b: str
    outputs: list[OutputMetrics] = field(default_factory=list)


@dataclass
class LayerMetrics:
    """One intermediate tensor of the model against the same tensor of the FP32 reference ONNX.

    Attributes:
        layer: display name (the reference tensor name, or the node name when matched by node).
        op_type: ``DequantizeLinear`` (a quantized activation) or the compute op (Conv, Gemm, MatMul ...).
        tensor: tensor name in the verified model.
        reference_tensor: tensor name in the reference model.
        matched_by: ``"tensor name"`` or ``"node name"``.
        mse: mean squared error.
        sqnr_db: SQNR in dB.
        max_abs_err: largest absolute difference.
        cosine: cosine similarity.
    """

    layer: str
    op_type: str
    tensor: str
    reference_tensor: str
    matched_by: str
    mse: float = math.nan
    sqnr_db: float = math.nan
    max_abs_err: float = math.nan
    cosine: float = math.nan


@dataclass
class PerLayerReport:
    """Per-layer comparison on ONNX Runtime (optimizations off) against an FP32 ONNX reference.

    Attributes:
        backend: the runtime used for both models.
        status: ``"ok"``, ``"skipped"`` or ``"error"``.
        message: reason for a skip or an error, or how the reference was obtained.
        layers: matched layers in graph order.
        unmatched: candidates of the model with no counterpart in the reference.
        worst: names of the lowest-SQNR layers, worst first.
    """

    backend: str = "onnxruntime-noopt"
    status: str = "ok"
    message: str = ""
    layers: list[LayerMetrics] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    worst: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    """Everything :func:`verify` measured.

    Attributes:
        model: path of the verified ONNX model.
        reference: description of the reference.
        num_batches: number of input batches.
        num_samples: number of samples (sum of first-dimension sizes of the first input).
        output_names: outputs of the model.
        backends: one result per requested backend, in request order.
        pairs: every pair of backends that ran.
        per_layer: per-layer report, when requested.
        min_sqnr_db: the SQNR threshold :meth:`failures` applies (None: none).
        min_top1: the top-1 threshold :meth:`failures` applies (None: none).
        file_problems: what ``check`` found wrong with the file whatever the target (invalid ONNX,
            external data, unusable scales): each one fails the report even if a runtime ran the file.
    """

    model: str
    reference: str
    num_batches: int
    num_samples: int
    output_names: list[str]
    backends: list[BackendResult] = field(default_factory=list)
    pairs: list[PairResult] = field(default_factory=list)
    per_layer: PerLayerReport | None = None
    min_sqnr_db: float | None = DEFAULT_MIN_SQNR_DB
    min_top1: float | None = DEFAULT_MIN_TOP1
    file_problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The report as plain Python data (floats may be inf or nan).

        Returns:
            A nested dict of lists, strings and numbers.
        """
        return asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The report as strict JSON; inf and nan become the strings ``"inf"``, ``"-inf"``, ``"nan"``.

        Args:
            path: file to write, if given.

        Returns:
            The JSON text.
        """
        text = json.dumps(json_safe(self.to_dict()), indent=2)
        if path is not None:
            write_text_atomically(path, text + "\n")
        return text

    def failures(self, min_sqnr_db: float | None = None, min_top1: float | None = None) -> list[str]:
        """Why :meth:`ok` would be False (empty when it is True).

        Args:
            min_sqnr_db: lowest acceptable SQNR per output; None: the report's own
                (:attr:`min_sqnr_db`, by default :data:`DEFAULT_MIN_SQNR_DB`).
            min_top1: lowest acceptable top-1 agreement as a fraction in [0, 1]; None: the
                report's own (:attr:`min_top1`, by default :data:`DEFAULT_MIN_TOP1`).

        Returns:
            One line per problem.

        Raises:
            ConfigError: a threshold that is NaN, infinite, or (top-1) outside [0, 1].
        """
        min_sqnr_db = self.min_sqnr_db if min_sqnr_db is None else min_sqnr_db
        min_top1 = self.min_top1 if min_top1 is None else min_top1
        validate_thresholds(min_sqnr_db, min_top1)
        problems = [f"file: {p}" for p in self.file_problems]
        if self.num_samples <= 0:
            problems.append("no sample was compared")
        if not any(b.status == "ok" for b in self.backends):
            problems.append("no backend ran (all skipped or failed)")
        for b in self.backends:
            if b.status == "error":
                problems.append(f"{b.backend}: error: {b.message}")
            for o in b.outputs:
                where = f"{b.backend} output {o.output}"
                if math.isnan(o.mse):
                    empty = 0 in o.shape
                    problems.append(f"{where}: {'empty, no value compared' if empty else 'non-finite values'}")
                if min_sqnr_db is not None and not o.sqnr_db >= min_sqnr_db:
                    problems.append(f"{where}: SQNR {format_db(o.sqnr_db)} dB < {min_sqnr_db} dB")
                if min_top1 is not None and o.top1 is not None and not o.top1 >= min_top1:
                    problems.append(f"{where}: top-1 {format_pct(o.top1)} < {format_pct(min_top1)}")
        return problems

    def ok(self, min_sqnr_db: float | None = None, min_top1: float | None = None) -> bool:
        """True when at least one backend ran, none failed, and every output meets the thresholds.

        Skipped backends do not count against it; pairs and per-layer figures are diagnostics only.

        Args:
            min_sqnr_db: lowest acceptable SQNR (dB) of every output of every backend; None: the
                report's own (by default :data:`DEFAULT_MIN_SQNR_DB`).
            min_top1: lowest acceptable top-1 agreement (fraction in [0, 1]) of every 2-D output;
                None: the report's own (by default :data:`DEFAULT_MIN_TOP1`).

        Returns:
            Whether the model passes.
        """
        return not self.failures(min_sqnr_db, min_top1)

    def table(self) -> str:
        """A fixed-width text rendering of every figure in the report.

        Returns:
            The text, lines separated by newlines.
        """
        return "\n".join(render(self, markdown=False))

    def to_markdown(self, path: str | os.PathLike | None = None) -> str:
        """The report as Markdown tables.

        Args:
            path: file to write, if given.

        Returns:
            The Markdown text.
        """
        text = "\n".join(render(self, markdown=True)) + "\n"
        if path is not None:
            write_text_atomically(path, text)
        return text


def json_safe(obj):
    """``obj`` with every non-finite float replaced by ``"nan"``, ``"inf"`` or ``"-inf"`` (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
