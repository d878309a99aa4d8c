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
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

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
from qtrim_fx.verification.inputs import (
    MAX_GENERATED_ELEMENTS,
    random_inputs,
    read_graph_inputs,
    require_regular_file,
    run_reference,
    to_numpy_batches,
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

# --- backends ------------------------------------------------------------------------------------------


def _python_for(
    backend: str, qnn_python: str | None, subprocess_python: Mapping[str, str] | None
) -> str | None:
    if backend == "qnn" and qnn_python:
        return qnn_python
    if subprocess_python and backend in subprocess_python:
        return subprocess_python[backend]
    return os.environ.get(f"QTRIM_{backend.upper().replace('-', '_')}_PYTHON") or None


def _run_subprocess(
    python: str, backend: str, model_path: str, batches: Sequence[Batch], options: Mapping[str, str]
) -> BackendRun:
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
        cmd += [x for k, v in options.items() for x in ("--option", f"{k}={v}")]
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
    return BackendRun(outputs, result["output_names"], info, result["seconds"], result.get("ep_nodes", {}))


def _run_one(
    backend: str, model_path: str, batches: Sequence[Batch], python: str | None, options: Mapping[str, str]
) -> BackendRun:
    if python is not None:
        return _run_subprocess(python, backend, model_path, batches, options)
    return worker.run_backend(backend, model_path, batches, options)


def _result(
    backend: str, model_path: str, batches, reference_out, names, python, options: Mapping[str, str]
) -> tuple[BackendResult, list | None]:
    try:
        run = _run_one(backend, model_path, batches, python, options)
        outputs = compare_outputs(reference_out, run.outputs, names)
    except BackendUnavailable as e:
        return BackendResult(backend, "skipped", message=str(e)), None
    except Exception as e:
        message = " ".join(f"{type(e).__name__}: {e}".split())  # runtimes pad messages with blank lines
        return BackendResult(backend, "error", message=worker.ir_version_hint(message)), None
    result = BackendResult(backend, "ok", info=run.info, seconds=run.seconds, outputs=outputs, ep_nodes=run.ep_nodes)
    return result, run.outputs


# --- verify --------------------------------------------------------------------------------------------


def _backend_options(given: Mapping[str, Mapping[str, str]] | None) -> dict[str, dict[str, str]]:
    """Validate ``backend_options`` before anything runs."""
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"backend_options must be a dict {{backend: {{option: value}}}}, got {type(given).__name__}")
    out: dict[str, dict[str, str]] = {}
    for backend, opts in given.items():
        if backend not in worker.OPTION_BACKENDS:
            raise ConfigError(f"backend_options for {backend!r}: only {', '.join(worker.OPTION_BACKENDS)} "
                              "take options")
        if not isinstance(opts, Mapping):
            raise ConfigError(f"backend_options[{backend!r}] must be a dict of option: value, e.g. "
                              "{'soc_model': '60'}")
        out[backend] = {str(k): str(v) for k, v in opts.items()}
    return out


#: ``check`` rules that make a file unfit to verify whatever the target: a runtime may still run it
#: (ONNX Runtime computes something from a NaN weight scale), but what it computes means nothing.
_INVALID_FILE_RULES = ("invalid_model", "external_data", "scale_value")


def _file_problems(model_path: str | os.PathLike) -> list[str]:
    """The target-independent ``check`` errors of the file (each fails the report)."""
    from qtrim_fx.onnx.check import check

    return [f"{v.rule} at {v.node}: {v.message}" for v in check(model_path, "onnxruntime")
            if v.rule in _INVALID_FILE_RULES and v.severity == "error"]


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
    backend_options: Mapping[str, Mapping[str, str]] | None = None,
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
        backend_options: ``{backend: {option: value}}``, e.g. ``{"qnn": {"soc_model": "60"}}``. The ``qnn``
            backend runs strictly by default (CPU fallback disabled: a node the HTP cannot take is an
            error, not a silent CPU island); ``{"qnn": {"strict": "0"}}`` allows the fallback. Other QNN
            options go to the execution provider as given. Per-provider node counts are in
            ``BackendResult.ep_nodes``.

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
    require_regular_file(model_path, "ONNX model")
    validate_thresholds(min_sqnr_db, min_top1)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ConfigError(f"unknown backend(s) {unknown}; known backends: {', '.join(BACKENDS)}")
    options = _backend_options(backend_options)
    model, graph_inputs = read_graph_inputs(model_path)
    names = [o.name for o in model.graph.output]
    batches = to_numpy_batches(inputs, graph_inputs, model_path)
    reference_out, reference_label = run_reference(reference, batches)
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
        file_problems=_file_problems(model_path),
    )
    ran: dict[str, list[Batch]] = {}
    for backend in dict.fromkeys(backends):
        python = _python_for(backend, qnn_python, subprocess_python)
        result, outputs = _result(backend, model_path, batches, reference_out, names, python,
                                  options.get(backend, {}))
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


