"""Verify an exported (QDQ) ONNX model on real runtimes against a reference.

``verify`` runs the ONNX file on every requested backend, runs the reference (a torch module or an FP32
ONNX file) on the same batches, and reports per output: MSE, SQNR, max abs error, cosine similarity
and, for ``(batch, classes)`` outputs, top-1 agreement; the same figures between every pair of
backends; and optionally per layer (intermediate tensors of the model vs the FP32 reference ONNX)::

    report = verify("model.qdq.onnx", "model.fp32.onnx", batches, per_layer=True)
    print(report.table())
    report.to_json("verify.json")
    assert report.ok(min_sqnr_db=20, min_top1=0.98)

Backends: ``onnxruntime`` (CPU, all graph optimizations), ``onnxruntime-noopt``
(``ORT_DISABLE_ALL``: the QDQ semantics without fusions), ``openvino`` (CPU, f32 inference
precision), ``onnx-reference`` (``onnx.reference.ReferenceEvaluator``, skipped above 2e6 parameters)
and ``qnn`` (ORT's QNN execution provider, HTP backend simulated on x86). A backend that is not
installed is ``skipped`` with the install hint; one that fails is ``error`` with the message; neither
stops the others. Any backend can run in another interpreter (``qnn`` usually does, set with
``qnn_python=`` or ``QTRIM_QNN_PYTHON``; others with ``subprocess_python=`` or
``QTRIM_<BACKEND>_PYTHON``, e.g. ``QTRIM_OPENVINO_PYTHON``): see :mod:`qtrim_fx._backend_worker`.

Metrics of ``b`` against reference ``a`` (accumulated in float64 over all batches)::

    MSE = mean((b - a)^2)    SQNR = 10 log10(sum a^2 / sum (b - a)^2) dB (inf when b == a)
    max|err| = max |b - a|   cosine = <a, b> / (|a| |b|)   top-1 = share of rows with equal argmax
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import _backend_worker as worker
from ._backend_worker import BACKENDS, INSTALL_HINTS, BackendRun, BackendUnavailable, Batch

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKENDS",
    "BackendResult",
    "LayerMetrics",
    "OutputMetrics",
    "PairResult",
    "PerLayerReport",
    "VerifyReport",
    "verify",
]

DEFAULT_BACKENDS = ("onnxruntime", "onnxruntime-noopt", "openvino", "onnx-reference", "qnn")
WORKER_TIMEOUT_S = float(os.environ.get("QTRIM_WORKER_TIMEOUT", "3600"))
PER_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
WORST_LAYERS = 5


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
    """

    backend: str
    status: str
    message: str = ""
    info: str = ""
    seconds: float = 0.0
    outputs: list[OutputMetrics] = field(default_factory=list)


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
    """

    model: str
    reference: str
    num_batches: int
    num_samples: int
    output_names: list[str]
    backends: list[BackendResult] = field(default_factory=list)
    pairs: list[PairResult] = field(default_factory=list)
    per_layer: PerLayerReport | None = None

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
        text = json.dumps(_json_safe(self.to_dict()), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def failures(self, min_sqnr_db: float | None = None, min_top1: float | None = None) -> list[str]:
        """Why :meth:`ok` would be False (empty when it is True).

        Args:
            min_sqnr_db: lowest acceptable SQNR per output, or None.
            min_top1: lowest acceptable top-1 agreement as a fraction in [0, 1], or None.

        Returns:
            One line per problem.
        """
        if min_top1 is not None and not 0.0 <= min_top1 <= 1.0:
            raise ValueError(f"min_top1={min_top1} must be a fraction in [0, 1], e.g. 0.99 for 99 %")
        problems = []
        if not any(b.status == "ok" for b in self.backends):
            problems.append("no backend ran (all skipped or failed)")
        for b in self.backends:
            if b.status == "error":
                problems.append(f"{b.backend}: error: {b.message}")
            for o in b.outputs:
                where = f"{b.backend} output {o.output}"
                if math.isnan(o.mse):
                    problems.append(f"{where}: non-finite values")
                if min_sqnr_db is not None and not o.sqnr_db >= min_sqnr_db:
                    problems.append(f"{where}: SQNR {_db(o.sqnr_db)} dB < {min_sqnr_db} dB")
                if min_top1 is not None and o.top1 is not None and not o.top1 >= min_top1:
                    problems.append(f"{where}: top-1 {_pct(o.top1)} < {_pct(min_top1)}")
        return problems

    def ok(self, min_sqnr_db: float | None = None, min_top1: float | None = None) -> bool:
        """True when at least one backend ran, none failed, and every output meets the thresholds.

        Skipped backends do not count against it; pairs and per-layer figures are diagnostics only.

        Args:
            min_sqnr_db: lowest acceptable SQNR (dB) of every output of every backend, or None.
            min_top1: lowest acceptable top-1 agreement (fraction in [0, 1]) of every 2-D output, or None.

        Returns:
            Whether the model passes.
        """
        return not self.failures(min_sqnr_db, min_top1)

    def table(self) -> str:
        """A fixed-width text rendering of every figure in the report.

        Returns:
            The text, lines separated by newlines.
        """
        return "\n".join(_render(self, markdown=False))

    def to_markdown(self, path: str | os.PathLike | None = None) -> str:
        """The report as Markdown tables.

        Args:
            path: file to write, if given.

        Returns:
            The Markdown text.
        """
        text = "\n".join(_render(self, markdown=True)) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


# --- metrics -------------------------------------------------------------------------------------------


class _Accumulator:
    """Streams error statistics of ``test`` against ``ref`` over batches, in float64."""

    def __init__(self) -> None:
        self.ref_sq = self.err_sq = self.dot = self.test_sq = self.max_abs = 0.0
        self.count = self.top1_hits = self.top1_rows = 0
        self.shape: list[int] | None = None
        self.classifier = True

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        ref, test = np.asarray(ref, dtype=np.float64), np.asarray(test, dtype=np.float64)
        if ref.shape != test.shape:
            raise ValueError(f"shape {list(test.shape)} differs from the reference's {list(ref.shape)}")
        if self.shape is None:
            self.shape = list(ref.shape)
        err = test - ref
        self.ref_sq += float(np.sum(ref * ref))
        self.err_sq += float(np.sum(err * err))
        self.dot += float(np.sum(ref * test))
        self.test_sq += float(np.sum(test * test))
        if err.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(err))))
        self.count += err.size
        self.classifier = self.classifier and ref.ndim == 2 and ref.shape[1] > 1
        if self.classifier:
            self.top1_hits += int(np.sum(ref.argmax(axis=1) == test.argmax(axis=1)))
            self.top1_rows += ref.shape[0]

    def metrics(self, name: str) -> OutputMetrics:
        finite = math.isfinite(self.err_sq) and math.isfinite(self.ref_sq)
        if not finite:
            sqnr = math.nan
        elif self.err_sq == 0.0:
            sqnr = math.inf
        elif self.ref_sq == 0.0:
            sqnr = -math.inf
        else:
            sqnr = 10.0 * math.log10(self.ref_sq / self.err_sq)
        norm = math.sqrt(self.ref_sq * self.test_sq)
        if not finite:
            cosine = math.nan
        elif norm > 0.0:
            cosine = self.dot / norm
        else:
            cosine = 1.0 if self.ref_sq == self.test_sq else 0.0
        return OutputMetrics(
            output=name,
            shape=self.shape or [],
            mse=self.err_sq / self.count if self.count and finite else (math.nan if not finite else 0.0),
            sqnr_db=sqnr,
            max_abs_err=self.max_abs if finite else math.nan,
            cosine=cosine,
            top1=self.top1_hits / self.top1_rows if self.classifier and self.top1_rows else None,
        )


def _compare(ref: Sequence[Batch], test: Sequence[Batch], names: Sequence[str]) -> list[OutputMetrics]:
    accs = [_Accumulator() for _ in names]
    for bi, (r, t) in enumerate(zip(ref, test, strict=True)):
        if len(r) != len(t):
            raise ValueError(f"batch {bi}: {len(t)} outputs, the reference has {len(r)}")
        for oi, acc in enumerate(accs):
            try:
                acc.update(r[oi], t[oi])
            except ValueError as e:
                raise ValueError(f"batch {bi}, output {names[oi]}: {e}") from None
    return [acc.metrics(n) for acc, n in zip(accs, names, strict=True)]


# --- inputs and the reference --------------------------------------------------------------------------


def _input_names(model) -> list[str]:
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def _graph_inputs(model_path: str):
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return model, [i for i in model.graph.input if i.name not in initializers]


def _to_numpy_batches(inputs, graph_inputs, model_path: str) -> list[Batch]:
    import onnx

    if isinstance(inputs, torch.Tensor | np.ndarray):
        inputs = [inputs]
    batches: list[Batch] = []
    names = [i.name for i in graph_inputs]
    for bi, batch in enumerate(inputs):
        items = list(batch) if isinstance(batch, tuple | list) else [batch]
        if len(items) != len(names):
            raise ValueError(
                f"batch {bi} has {len(items)} tensor(s) but {model_path} takes {len(names)} input(s) "
                f"({', '.join(names)}); pass one tensor per input, e.g. [x for x, _ in loader] to drop labels"
            )
        arrays = []
        for item, spec in zip(items, graph_inputs, strict=True):
            a = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
            want = onnx.helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type)
            if a.dtype != want and np.issubdtype(a.dtype, np.floating) and np.issubdtype(want, np.floating):
                a = a.astype(want)
            arrays.append(a)
        batches.append(arrays)
    if not batches:
        raise ValueError("inputs is empty: pass a list of input batches (tensors or tuples of tensors)")
    return batches


def _flatten_outputs(out) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().float().numpy() if out.is_floating_point() else out.detach().cpu().numpy()]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [a for o in out for a in _flatten_outputs(o)]
    return []


def _run_torch(module: torch.nn.Module, batches: Sequence[Batch]) -> list[Batch]:
    device = next(module.parameters(), torch.empty(0)).device
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return [
                _flatten_outputs(module(*(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in b)))
                for b in batches
            ]
    finally:
        module.train(was_training)


def _run_reference(reference, batches: Sequence[Batch]) -> tuple[list[Batch], str]:
    if isinstance(reference, torch.nn.Module):
        return _run_torch(reference, batches), f"torch {type(reference).__name__} (eval, no grad)"
    if isinstance(reference, str | os.PathLike):
        path = os.fspath(reference)
        if not os.path.exists(path):
            raise FileNotFoundError(f"reference ONNX file {path} does not exist")
        run = worker.run_backend("onnxruntime-noopt", path, batches)
        return run.outputs, f"{path} (onnxruntime, ORT_DISABLE_ALL)"
    raise TypeError(
        f"reference must be a torch nn.Module or the path of an FP32 ONNX file, not {type(reference).__name__}"
    )


# --- backends ------------------------------------------------------------------------------------------


def _python_for(
    backend: str, qnn_python: str | None, subprocess_python: Mapping[str, str] | None
) -> str | None:
    if backend == "qnn" and qnn_python:
        return qnn_python
    if subprocess_python and backend in subprocess_python:
        return subprocess_python[backend]
    return os.environ.get(f"QTRIM_{backend.upper().replace('-', '_')}_PYTHON") or None


def _run_subprocess(python: str, backend: str, model_path: str, batches: Sequence[Batch]) -> BackendRun:
    if not (os.path.isfile(python) or shutil.which(python)):
        raise BackendUnavailable(
            f"python interpreter {python!r} for {backend} does not exist: {INSTALL_HINTS[backend]}"
        )
    with tempfile.TemporaryDirectory(prefix="qtrim_worker_") as tmp:
        # Run a copy by path: inside the package folder, qtrim_fx/onnx/ would shadow the onnx package.
        script = shutil.copy(worker.__file__, os.path.join(tmp, "qtrim_backend_worker.py"))
        paths = {
            k: os.path.join(tmp, f"{k}.{ext}")
            for k, ext in (("inputs", "npz"), ("outputs", "npz"), ("result", "json"))
        }
        worker.save_batches(paths["inputs"], batches)
        cmd = [python, script, "--backend", backend, "--model", os.path.abspath(model_path)]
        cmd += [x for k, p in paths.items() for x in (f"--{k}", p)]
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        except OSError as e:
            raise BackendUnavailable(f"cannot start {python!r} ({e}): {INSTALL_HINTS[backend]}") from e
        if not os.path.exists(paths["result"]):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"worker in {python} exited with code {proc.returncode}: {' | '.join(tail)}")
        result = json.loads(Path(paths["result"]).read_text())
        if result["status"] == "skipped":
            raise BackendUnavailable(result["message"])
        if result["status"] == "error":
            raise RuntimeError(f"{result['message']} (in {result.get('python', python)})")
        outputs = worker.load_batches(paths["outputs"])
    info = f"{result['info']}; out of process in {python}"
    return BackendRun(outputs, result["output_names"], info, result["seconds"])


def _run_one(backend: str, model_path: str, batches: Sequence[Batch], python: str | None) -> BackendRun:
    if python is not None:
        return _run_subprocess(python, backend, model_path, batches)
    return worker.run_backend(backend, model_path, batches)


def _result(
    backend: str, model_path: str, batches, reference_out, names, python
) -> tuple[BackendResult, list | None]:
    try:
        run = _run_one(backend, model_path, batches, python)
        outputs = _compare(reference_out, run.outputs, names)
    except BackendUnavailable as e:
        return BackendResult(backend, "skipped", message=str(e)), None
    except Exception as e:
        message = " ".join(f"{type(e).__name__}: {e}".split())  # runtimes pad messages with blank lines
        return BackendResult(backend, "error", message=worker.ir_version_hint(message)), None
    return BackendResult(backend, "ok", info=run.info, seconds=run.seconds, outputs=outputs), run.outputs


# --- per layer -----------------------------------------------------------------------------------------


class _LayerMatcher:
    """Pairs intermediate tensors of the model with tensors of the FP32 reference, by shared names.

    A quantized activation (DequantizeLinear after an activation QuantizeLinear) is compared with the
    tensor its QuantizeLinear reads, looked up by tensor name first: a Conv whose ReLU was folded into
    the following Q keeps the ReLU's output name, and the DQ output is post-ReLU (the Q clamps), so the
    tensor name is the faithful match. A compute node (Conv, Gemm, MatMul ...) is compared by node name
    first, for the same reason reversed: its own output there is pre-ReLU.
    """

    def __init__(self, model, ref) -> None:
        self.ref_producer = {o: n for n in ref.graph.node for o in n.output}
        self.ref_inputs = {i.name for i in ref.graph.input}
        self.ref_nodes = {n.name: n for n in ref.graph.node if n.name}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.constants = {t.name for t in model.graph.initializer}
        self.constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
        self.by_order = _order_twins(model, ref)

    def by_tensor(self, tensor: str, op_type: str | None) -> str | None:
        ref_node = self.ref_producer.get(tensor)
        if tensor in self.ref_inputs or (ref_node is not None and op_type in (None, ref_node.op_type)):
            return tensor
        return None

    def by_node(self, tensor: str) -> str | None:
        node = self.producer.get(tensor)
        twin = self.ref_nodes.get(node.name) if node is not None and node.name else None
        if twin is None or twin.op_type != node.op_type:
            return None
        return twin.output[list(node.output).index(tensor)]

    def activation(self, dq) -> LayerMetrics | str | None:
        q = self.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in self.constants:
            return None  # weight DQ (int8 initializer) or weight Q/DQ pair: not an activation
        x = q.input[0]
        if (ref := self.by_tensor(x, None)) is not None:
            return LayerMetrics(x, "DequantizeLinear", dq.output[0], ref, "tensor name")
        if (ref := self.by_node(x)) is not None:
            label = f"{self.producer[x].name} (quantized output)"
            return LayerMetrics(label, "DequantizeLinear", dq.output[0], ref, "node name")
        return f"{dq.name or dq.output[0]} (DequantizeLinear of {x})"

    def compute(self, node) -> LayerMetrics | str:
        out, label = node.output[0], node.name or node.output[0]
        if (ref := self.by_node(out)) is not None:
            return LayerMetrics(label, node.op_type, out, ref, "node name")
        if (ref := self.by_tensor(out, node.op_type)) is not None:
            return LayerMetrics(label, node.op_type, out, ref, "tensor name")
        if (ref := self.by_order.get(out)) is not None:
            return LayerMetrics(label, node.op_type, out, ref, "graph order")
        return f"{label} ({node.op_type})"


def _order_twins(model, ref) -> dict[str, str]:
    """Compute-node outputs paired by graph order when both graphs hold the same sequence of them.

    Exports of one network by different tools (ours names ops after modules, ``torch.onnx.export``
    after its scopes, BN folding renames weights) rarely share names, but they keep the order of
    the Conv/Gemm/MatMul nodes.
    """
    ours = [n for n in model.graph.node if n.op_type in PER_LAYER_OPS]
    theirs = [n for n in ref.graph.node if n.op_type in PER_LAYER_OPS]
    if len(ours) != len(theirs) or any(a.op_type != b.op_type for a, b in zip(ours, theirs, strict=True)):
        return {}
    return {a.output[0]: b.output[0] for a, b in zip(ours, theirs, strict=True)}


def _match_layers(model, ref) -> tuple[list[LayerMetrics], list[str]]:
    """Matched layers of ``model`` (graph order, unique names) and the candidates left unmatched."""
    matcher = _LayerMatcher(model, ref)
    layers: list[LayerMetrics] = []
    unmatched: list[str] = []
    seen: set[tuple[str, str]] = set()
    names: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            found = matcher.activation(node)
        elif node.op_type in PER_LAYER_OPS:
            found = matcher.compute(node)
        else:
            continue
        if isinstance(found, str):
            unmatched.append(found)
        elif found is not None and (found.tensor, found.reference_tensor) not in seen:
            seen.add((found.tensor, found.reference_tensor))
            base, k = found.layer, 2
            while found.layer in names:
                found.layer, k = f"{base} #{k}", k + 1
            names.add(found.layer)
            layers.append(found)
    return layers, unmatched


def _with_outputs(model, names: Iterable[str], path: str) -> str:
    import onnx

    existing = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in existing)
    onnx.save_model(copy, path, save_as_external_data=True, location=os.path.basename(path) + ".data")
    return path


def _export_torch_reference(module: torch.nn.Module, batches: Sequence[Batch], model, path: str) -> str:
    names = _input_names(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    device = next(module.parameters(), torch.empty(0)).device
    example = tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in batches[0])
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                example,
                path,
                dynamo=False,
                input_names=names,
                opset_version=max(13, min(opset, 20)),
                dynamic_axes={n: {0: "batch"} for n in names},
            )
    finally:
        module.train(was_training)
    return path


def _per_layer(model_path: str, reference, batches: Sequence[Batch], tmp: str) -> PerLayerReport:
    import onnx

    report = PerLayerReport()
    model = onnx.load(model_path)
    if isinstance(reference, torch.nn.Module):
        try:
            ref_path = _export_torch_reference(reference, batches, model, os.path.join(tmp, "reference.onnx"))
        except Exception as e:
            report.status = "error"
            report.message = (
                f"could not export the torch reference to ONNX for per-layer matching ({type(e).__name__}: {e}); "
                "pass the FP32 ONNX file as reference instead"
            )
            return report
        report.message = (
            "torch reference exported with torch.onnx.export(dynamo=False); matched by tensor/node names"
        )
    else:
        ref_path = os.fspath(reference)
        report.message = f"matched against {os.path.basename(ref_path)} by tensor/node names"
    ref = onnx.load(ref_path)
    report.layers, report.unmatched = _match_layers(model, ref)
    if not report.layers:
        report.status = "error"
        report.message += "; no intermediate tensor or node name is shared by both graphs"
        return report
    try:
        _measure_layers(report.layers, model, ref, batches, tmp)
    except Exception as e:
        report.status = "error"
        report.message += f"; running the models with extra outputs failed: {type(e).__name__}: {e}"
        return report
    ranked = sorted(report.layers, key=lambda layer: (math.isnan(layer.sqnr_db), layer.sqnr_db))
    report.worst = [layer.layer for layer in ranked[:WORST_LAYERS]]
    return report


def _named_outputs(model_path: str, batches: Sequence[Batch], feeds_names: Sequence[str]) -> list[dict]:
    run = worker.run_backend("onnxruntime-noopt", model_path, batches)
    named = []
    for b, outs in zip(batches, run.outputs, strict=True):
        values = dict(zip(feeds_names, b, strict=True))
        values.update(zip(run.output_names, outs, strict=True))
        named.append(values)
    return named


def _measure_layers(layers: list[LayerMetrics], model, ref, batches: Sequence[Batch], tmp: str) -> None:
    model_file = _with_outputs(model, (la.tensor for la in layers), os.path.join(tmp, "model_layers.onnx"))
    ref_file = _with_outputs(
        ref, (la.reference_tensor for la in layers), os.path.join(tmp, "reference_layers.onnx")
    )
    got = _named_outputs(model_file, batches, _input_names(model))
    want = _named_outputs(ref_file, batches, _input_names(ref))
    for layer in layers:
        acc = _Accumulator()
        for g, w in zip(got, want, strict=True):
            acc.update(w[layer.reference_tensor], g[layer.tensor])
        m = acc.metrics(layer.layer)
        layer.mse, layer.sqnr_db, layer.max_abs_err, layer.cosine = m.mse, m.sqnr_db, m.max_abs_err, m.cosine


# --- verify --------------------------------------------------------------------------------------------


def verify(
    onnx_path: str | os.PathLike,
    reference: torch.nn.Module | str | os.PathLike,
    inputs: Sequence,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    per_layer: bool = False,
    qnn_python: str | None = None,
    subprocess_python: Mapping[str, str] | None = None,
) -> VerifyReport:
    """Run an ONNX model on real runtimes and measure how closely each one matches the reference.

    Args:
        onnx_path: the model to verify (usually the QDQ export).
        reference: a torch module (run in eval mode without gradients; its training flag is restored) or
            the path of an FP32 ONNX file (run with onnxruntime, optimizations disabled).
        inputs: input batches: each a tensor/array, or a tuple of them (one per graph input, in order).
        backends: backends to run, any of :data:`BACKENDS`.
        per_layer: also compare intermediate tensors of the model with the FP32 reference ONNX
            (onnxruntime, optimizations disabled). A torch reference is exported with
            ``torch.onnx.export(dynamo=False)`` for this, so give the float model (not a prepared one,
            whose export would be quantized too) or, better, its FP32 ONNX file.
        qnn_python: python of a venv with onnxruntime-qnn, for the ``qnn`` backend (default: the
            ``QTRIM_QNN_PYTHON`` environment variable; without either, it runs in this process if
            ``onnxruntime_qnn`` is importable here, else it is skipped).
        subprocess_python: ``{backend: python}`` to run other backends out of process too (default: the
            ``QTRIM_<BACKEND>_PYTHON`` environment variables, ``-`` written as ``_``).

    Returns:
        The :class:`VerifyReport`. Unavailable backends are ``skipped``, failing ones ``error``.

    Raises:
        ValueError: unknown backend, empty inputs, or batches that do not fit the model's inputs.
        FileNotFoundError: the model or reference file does not exist.
        TypeError: the reference is neither a module nor a path.
    """
    model_path = os.fspath(onnx_path)
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"ONNX model {model_path} does not exist")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; known backends: {', '.join(BACKENDS)}")
    model, graph_inputs = _graph_inputs(model_path)
    names = [o.name for o in model.graph.output]
    batches = _to_numpy_batches(inputs, graph_inputs, model_path)
    reference_out, reference_label = _run_reference(reference, batches)
    if len(reference_out[0]) != len(names):
        raise ValueError(
            f"the reference gives {len(reference_out[0])} output(s) but {model_path} has {len(names)} "
            f"({', '.join(names)}); compare models with the same outputs"
        )
    report = VerifyReport(
        model=model_path,
        reference=reference_label,
        num_batches=len(batches),
        num_samples=sum(int(b[0].shape[0]) if b[0].ndim else 1 for b in batches),
        output_names=names,
    )
    ran: dict[str, list[Batch]] = {}
    for backend in dict.fromkeys(backends):
        python = _python_for(backend, qnn_python, subprocess_python)
        result, outputs = _result(backend, model_path, batches, reference_out, names, python)
        report.backends.append(result)
        if outputs is not None:
            ran[backend] = outputs
    done = list(ran)
    for i, a in enumerate(done):
        for b in done[i + 1 :]:
            report.pairs.append(PairResult(a, b, _compare(ran[a], ran[b], names)))
    if per_layer:
        with tempfile.TemporaryDirectory(prefix="qtrim_layers_") as tmp:
            report.per_layer = _per_layer(model_path, reference, batches, tmp)
    return report


# --- rendering -----------------------------------------------------------------------------------------


def _db(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.2f}%"


def _sci(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3e}"


def _cos(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.6f}"


def _metric_cells(m: OutputMetrics) -> list[str]:
    return [
        m.output,
        "x".join(map(str, m.shape)),
        _sci(m.mse),
        _db(m.sqnr_db),
        _sci(m.max_abs_err),
        _cos(m.cosine),
        _pct(m.top1),
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


def _render_backends(report: VerifyReport, md: bool) -> list[str]:
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


def _render_pairs(report: VerifyReport, md: bool) -> list[str]:
    lines = _heading("Backend pairs (first backend taken as reference)", md)
    if not report.pairs:
        return [*lines, "(fewer than two backends ran)"]
    headers = ["backend a", "backend b", "output", "shape", "MSE", "SQNR dB", "max|err|", "cosine", "top-1"]
    rows = [[p.a, p.b, *_metric_cells(o)] for p in report.pairs for o in p.outputs]
    return lines + _grid(headers, rows, md)


def _render_layers(pl: PerLayerReport, md: bool) -> list[str]:
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
                _db(la.sqnr_db),
                _sci(la.mse),
                _sci(la.max_abs_err),
                _cos(la.cosine),
            ]
            for i, la in enumerate(pl.layers)
        ]
        lines += _grid(headers, rows, md)
    by_name = {la.layer: la for la in pl.layers}
    if pl.worst:
        worst = ", ".join(f"{n} ({_db(by_name[n].sqnr_db)} dB)" for n in pl.worst)
        lines += [*([""] if md else []), f"Worst layers: {worst}"]
    lines.append(
        f"Matched: {len(pl.layers)}; unmatched: {len(pl.unmatched)}"
        + (f" ({', '.join(pl.unmatched)})" if pl.unmatched else "")
    )
    return lines


def _render(report: VerifyReport, markdown: bool) -> list[str]:
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
