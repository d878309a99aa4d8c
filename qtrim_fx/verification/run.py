"""Verify an exported (QDQ) ONNX model on real runtimes against a reference.

``verify`` runs the ONNX file on every requested backend, runs the reference (a torch module or an FP32
ONNX file) on the same batches, and reports per output: MSE, SQNR, max abs error, cosine similarity
and, for ``(batch, classes)`` outputs, top-1 agreement; the same figures between every pair of
backends; and optionally per layer (intermediate tensors of the model vs the FP32 reference ONNX)::

    report = verify("model.qdq.onnx", "model.fp32.onnx", batches, per_layer=True)
    print(report.table())
    report.to_json("verify.json")
    assert report.ok()                              # the default thresholds: 20 dB, 90 % top-1
    assert report.ok(min_sqnr_db=30, min_top1=0.98)  # stricter, for this call

Pass/fail: ``report.failures()`` / ``report.ok()`` hold every output of every backend to the report's
thresholds, :data:`DEFAULT_MIN_SQNR_DB` = 20 dB and :data:`DEFAULT_MIN_TOP1` = 0.9 unless ``verify``
got others (``min_sqnr_db=None`` / ``min_top1=None`` turn one off); a backend error, non-finite
outputs and an empty comparison fail too. No inputs, or a batch without samples, is an error.

Inputs: pass real data where you have it. :func:`random_inputs` draws batches from the declared
input shapes of a file (symbolic dimensions take ``batch_size``), refusing more than
:data:`MAX_GENERATED_ELEMENTS` values per batch instead of allocating whatever a file declares.

Backends: ``onnxruntime`` (CPU, all graph optimizations), ``onnxruntime-noopt``
(``ORT_DISABLE_ALL``: the QDQ semantics without fusions), ``openvino`` (CPU, f32 inference
precision), ``onnx-reference`` (``onnx.reference.ReferenceEvaluator``, skipped above 2e6 parameters)
and ``qnn`` (ORT's QNN execution provider, HTP backend simulated on x86). A backend that is not
installed is ``skipped`` with the install hint; one that fails is ``error`` with the message; neither
stops the others. Any backend can run in another interpreter (``qnn`` usually does, set with
``qnn_python=`` or ``QTRIM_QNN_PYTHON``; others with ``subprocess_python=`` or
``QTRIM_<BACKEND>_PYTHON``, e.g. ``QTRIM_OPENVINO_PYTHON``): see :mod:`qtrim_fx.verification.backend_worker`.

Metrics of ``b`` against reference ``a`` (accumulated in float64 over all batches)::

    MSE = mean((b - a)^2)    SQNR = 10 log10(sum a^2 / sum (b - a)^2) dB (inf when b == a)
    max|err| = max |b - a|   cosine = <a, b> / (|a| |b|)   top-1 = share of rows with equal argmax
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from qtrim_fx.core.errors import ConfigError, VerifyError
from qtrim_fx.verification import backend_worker as worker
from qtrim_fx.verification.backend_worker import (
    BACKENDS,
    INSTALL_HINTS,
    BackendRun,
    BackendUnavailable,
    Batch,
)
from qtrim_fx.verification.metrics import compare_outputs, per_layer_report
from qtrim_fx.verification.report import (
    DEFAULT_MIN_SQNR_DB,
    DEFAULT_MIN_TOP1,
    BackendResult,
    LayerMetrics,
    OutputMetrics,
    PairResult,
    PerLayerReport,
    VerifyReport,
    validate_thresholds,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKENDS",
    "DEFAULT_MIN_SQNR_DB",
    "DEFAULT_MIN_TOP1",
    "MAX_GENERATED_ELEMENTS",
    "BackendResult",
    "LayerMetrics",
    "OutputMetrics",
    "PairResult",
    "PerLayerReport",
    "VerifyReport",
    "random_inputs",
    "verify",
]

DEFAULT_BACKENDS = ("onnxruntime", "onnxruntime-noopt", "openvino", "onnx-reference", "qnn")
WORKER_TIMEOUT_S = float(os.environ.get("QTRIM_WORKER_TIMEOUT", "3600"))
#: most values :func:`random_inputs` draws for one batch, all inputs together (2**26: 256 MiB of float32).
MAX_GENERATED_ELEMENTS = 2**26
#: a torch reference whose two runs on the same batch differ beyond this (relative to its largest
#: output) is reported as not reproducible.
_REPRODUCIBLE_RTOL = 1e-4

# --- inputs and the reference --------------------------------------------------------------------------


def _require_regular_file(path: str, what: str) -> None:
    """FileNotFoundError when missing, ConfigError when a folder, FIFO or device (reading it could block)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{what} {path} is not a regular file (a folder, FIFO or device); pass an .onnx file")


def _graph_inputs(model_path: str):
    import onnx

    try:
        model = onnx.load(model_path, load_external_data=False)
    except Exception as e:  # protobuf DecodeError on a truncated or foreign file
        message = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ConfigError(f"{model_path} does not parse as an ONNX model ({message}); it is truncated, "
                          "corrupted or not ONNX: run `qtrim check` on it, or export it again") from None
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
            raise ConfigError(
                f"batch {bi} has {len(items)} tensor(s) but {model_path} takes {len(names)} input(s) "
                f"({', '.join(names)}); pass one tensor per input, e.g. [x for x, _ in loader] to drop labels"
            )
        arrays = []
        for item, spec in zip(items, graph_inputs, strict=True):
            a = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
            if a.size == 0:
                raise ConfigError(
                    f"batch {bi}, input {spec.name!r} has shape {list(a.shape)}: no values, so nothing would be "
                    "compared (a batch size of 0?); give every batch at least one sample"
                )
            want = onnx.helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type)
            if a.dtype != want and np.issubdtype(a.dtype, np.floating) and np.issubdtype(want, np.floating):
                a = a.astype(want)
            arrays.append(a)
        batches.append(arrays)
    if not batches:
        raise ConfigError("inputs is empty: pass a list of input batches (tensors or tuples of tensors)")
    return batches


def random_inputs(
    model_path: str | os.PathLike, num_batches: int = 1, batch_size: int = 1, seed: int = 0
) -> list[tuple[np.ndarray, ...]]:
    """Random batches for the graph inputs of an ONNX file, for :func:`verify` when no data is at hand.

    Float inputs are standard normal, other types zero. A symbolic or unknown dimension takes
    ``batch_size``; a fixed one keeps the file's value, so the file decides the size: more than
    :data:`MAX_GENERATED_ELEMENTS` values in one batch are refused rather than allocated.

    Args:
        model_path: the ONNX file (its external data is not read).
        num_batches: how many batches (>= 1).
        batch_size: the size of every symbolic dimension (>= 1).
        seed: seed of the generator (the same seed gives the same batches).

    Returns:
        ``num_batches`` tuples of arrays, one array per graph input in order.

    Raises:
        ConfigError: bad counts, a non-tensor input, a declared dimension of 0, or a batch above the cap.
        FileNotFoundError: the file does not exist.
    """
    import onnx

    path = os.fspath(model_path)
    _require_regular_file(path, "ONNX model")
    if num_batches < 1 or batch_size < 1:
        raise ConfigError(f"num_batches={num_batches} and batch_size={batch_size} must both be at least 1")
    _, graph_inputs = _graph_inputs(path)
    specs = []
    for spec in graph_inputs:
        if not spec.type.HasField("tensor_type") or not spec.type.tensor_type.elem_type:
            raise ConfigError(f"input {spec.name!r} of {path} is not a tensor of a known type; pass inputs yourself")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else
                (0 if d.HasField("dim_value") and d.dim_value == 0 else batch_size)
                for d in spec.type.tensor_type.shape.dim]
        if 0 in dims:
            raise ConfigError(f"input {spec.name!r} of {path} declares shape {dims}: no values to feed")
        specs.append((spec.name, dims, onnx.helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type)))
    total = sum(math.prod(dims) for _, dims, _ in specs)
    if total > MAX_GENERATED_ELEMENTS:
        shapes = ", ".join(f"{name} {dims}" for name, dims, _ in specs)
        symbolic = any(not (d.HasField("dim_value") and d.dim_value > 0)
                       for spec in graph_inputs for d in spec.type.tensor_type.shape.dim)
        raise ConfigError(
            f"{path} declares inputs of {total:,} values per batch ({shapes}); random inputs are capped at "
            f"MAX_GENERATED_ELEMENTS = {MAX_GENERATED_ELEMENTS:,} values per batch rather than allocate that "
            "much: pass real, smaller inputs to verify(path, reference, [x, ...])"
            + (f" or a batch_size below {batch_size}" if symbolic and batch_size > 1 else "")
        )
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(num_batches):
        batch = []
        for _, dims, dtype in specs:
            if np.issubdtype(dtype, np.floating):
                batch.append(rng.standard_normal(dims, dtype=np.float32).astype(dtype))
            else:
                batch.append(np.zeros(dims, dtype))
        batches.append(tuple(batch))
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

    def run(batch: Batch) -> list[np.ndarray]:
        return _flatten_outputs(module(*(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in batch)))

    try:
        with torch.no_grad():
            outputs = [run(b) for b in batches]
            again = run(batches[0])
    finally:
        module.train(was_training)
    _warn_if_not_reproducible(outputs[0], again, type(module).__name__)
    return outputs


def _warn_if_not_reproducible(first: Batch, second: Batch, name: str) -> None:
    """Warn when two eval-mode runs of the torch reference on the same batch disagree."""
    worst = 0.0
    for a, b in zip(first, second, strict=False):
        if a.shape != b.shape:
            worst = math.inf
            break
        if a.size and np.issubdtype(a.dtype, np.number):
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            finite = np.isfinite(a64)
            scale = float(np.max(np.abs(a64[finite]))) if finite.any() else 0.0
            diff = np.abs(a64 - b64)
            same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
            err = float(np.max(np.where(same, 0.0, diff), initial=0.0))
            worst = max(worst, err / scale if scale > 0 else (math.inf if err > 0 else 0.0))
    if len(first) != len(second) or worst > _REPRODUCIBLE_RTOL:
        warnings.warn(
            f"the torch reference {name} gives different outputs for the same input on two calls in eval "
            f"mode (largest difference {worst:.3g} of its largest output); something random runs at inference "
            "(F.dropout(training=True), torch.rand, a stateful module), so every figure of this report is "
            "noisy: remove or seed the randomness, or pass the FP32 ONNX file as the reference",
            stacklevel=4,
        )


def _run_reference(reference, batches: Sequence[Batch]) -> tuple[list[Batch], str]:
    if isinstance(reference, torch.nn.Module):
        return _run_torch(reference, batches), f"torch {type(reference).__name__} (eval, no grad)"
    if isinstance(reference, str | os.PathLike):
        path = os.fspath(reference)
        _require_regular_file(path, "reference ONNX file")
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
            raise VerifyError(f"worker in {python} exited with code {proc.returncode}: {' | '.join(tail)}")
        result = json.loads(Path(paths["result"]).read_text())
        if result["status"] == "skipped":
            raise BackendUnavailable(result["message"])
        if result["status"] == "error":
            raise VerifyError(f"{result['message']} (in {result.get('python', python)})")
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
        outputs = compare_outputs(reference_out, run.outputs, names)
    except BackendUnavailable as e:
        return BackendResult(backend, "skipped", message=str(e)), None
    except Exception as e:
        message = " ".join(f"{type(e).__name__}: {e}".split())  # runtimes pad messages with blank lines
        return BackendResult(backend, "error", message=worker.ir_version_hint(message)), None
    return BackendResult(backend, "ok", info=run.info, seconds=run.seconds, outputs=outputs), run.outputs


# --- verify --------------------------------------------------------------------------------------------


def verify(
    onnx_path: str | os.PathLike,
    reference: torch.nn.Module | str | os.PathLike,
    inputs: Sequence,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    per_layer: bool = False,
    qnn_python: str | None = None,
    subprocess_python: Mapping[str, str] | None = None,
    min_sqnr_db: float | None = DEFAULT_MIN_SQNR_DB,
    min_top1: float | None = DEFAULT_MIN_TOP1,
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
        min_sqnr_db: the report's SQNR threshold in dB for every output (default
            :data:`DEFAULT_MIN_SQNR_DB` = 20); None turns it off.
        min_top1: the report's top-1 threshold, a fraction in [0, 1], for every 2-D output (default
            :data:`DEFAULT_MIN_TOP1` = 0.9); None turns it off.

    Returns:
        The :class:`VerifyReport`; ``report.ok()`` / ``report.failures()`` apply the thresholds.
        Unavailable backends are ``skipped``, failing ones ``error``.

    Raises:
        ConfigError: (a ``ValueError``) unknown backend, empty inputs, a batch without samples,
            batches that do not fit the model's inputs, a NaN/infinite/out-of-range threshold, or a
            model/reference path that is a folder, FIFO or device.
        FileNotFoundError: the model or reference file does not exist.
        TypeError: the reference is neither a module nor a path.

    Warns:
        UserWarning: a torch reference that gives other outputs on a second call with the same batch.
    """
    model_path = os.fspath(onnx_path)
    _require_regular_file(model_path, "ONNX model")
    validate_thresholds(min_sqnr_db, min_top1)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ConfigError(f"unknown backend(s) {unknown}; known backends: {', '.join(BACKENDS)}")
    model, graph_inputs = _graph_inputs(model_path)
    names = [o.name for o in model.graph.output]
    batches = _to_numpy_batches(inputs, graph_inputs, model_path)
    reference_out, reference_label = _run_reference(reference, batches)
    if len(reference_out[0]) != len(names):
        raise ConfigError(
            f"the reference gives {len(reference_out[0])} output(s) but {model_path} has {len(names)} "
            f"({', '.join(names)}); compare models with the same outputs"
        )
    report = VerifyReport(
        model=model_path,
        reference=reference_label,
        num_batches=len(batches),
        num_samples=sum(int(b[0].shape[0]) if b[0].ndim else 1 for b in batches),
        output_names=names,
        min_sqnr_db=min_sqnr_db,
        min_top1=min_top1,
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
            report.pairs.append(PairResult(a, b, compare_outputs(ran[a], ran[b], names)))
    if per_layer:
        with tempfile.TemporaryDirectory(prefix="qtrim_layers_") as tmp:
            report.per_layer = per_layer_report(model_path, reference, batches, tmp)
    return report


