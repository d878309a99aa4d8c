"""Run one ONNX model on one inference backend, in this process or as a worker in another interpreter.

:mod:`qtrim_fx.verify` calls :func:`run_backend` directly for backends installed next to it, and runs
this file as a script in another Python (a virtual environment) for backends that cannot share the
process, e.g. ``onnxruntime-qnn`` 1.x wheels, which replace the ``onnxruntime`` module::

    python _backend_worker.py --backend qnn --model m.onnx --inputs in.npz --outputs out.npz --result r.json \
        [--option soc_model=60 ...]

The file only needs numpy plus the backend's own package: it imports nothing from ``qtrim_fx`` (whose
``__init__`` needs torch), so ``verify`` copies it to a scratch folder and runs it there by path
(running it from inside the package folder would let ``qtrim_fx/onnx/`` shadow the real ``onnx``).
``python -m qtrim_fx.verification.backend_worker ...`` works as well where qtrim_fx is installed.

Exchange format: ``in.npz`` holds ``b{batch}_{input}`` arrays (inputs by position), ``out.npz`` holds
``b{batch}_{output}`` arrays, and ``r.json`` holds ``{"status": "ok"|"skipped"|"error", "message",
"info", "output_names", "seconds", "ep_nodes"}``. Exit code 0 unless the command line itself is wrong.

Backend options (``--option KEY=VALUE``, or ``options=`` of :func:`run_backend`): for ``qnn``,
``strict`` (default ``1``: CPU fallback disabled, so a node the HTP cannot take fails the session instead
of running silently on the CPU) and any QNN execution-provider option (``soc_model``,
``htp_performance_mode``, ``offload_graph_io_quantization`` ...), passed to the EP as given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

BACKENDS = ("onnxruntime", "onnxruntime-noopt", "openvino", "onnx-reference", "qnn")
"""Backend names this worker can run."""

OPTION_BACKENDS = ("qnn",)
"""Backends that take options (``run_backend(..., options=)``); the others take none."""

REFERENCE_MAX_PARAMS = 2_000_000
"""``onnx.reference`` runs pure numpy: models with more weights than this are skipped."""

INSTALL_HINTS = {
    "onnxruntime": "pip install onnxruntime",
    "onnxruntime-noopt": "pip install onnxruntime",
    "openvino": "pip install openvino",
    "onnx-reference": "pip install onnx",
    "qnn": (
        "pip install onnxruntime-qnn in a separate venv and set QTRIM_QNN_PYTHON (or pass qnn_python=) to "
        "that venv's python; onnxruntime-qnn 2.x is a plugin for a matching onnxruntime and may also be "
        "installed next to it"
    ),
}

Batch = list[np.ndarray]


class BackendUnavailable(Exception):
    """The backend is not installed or cannot run this model here; reported as ``skipped``."""


@dataclass
class BackendRun:
    """Outputs of one backend on every batch.

    Attributes:
        outputs: ``outputs[batch][output]`` arrays.
        output_names: graph output names, in order.
        info: one line on how it ran (providers, devices, nodes that fell back ...).
        seconds: wall time of the inference calls (session creation excluded).
        ep_nodes: nodes per execution provider (``{"QNNExecutionProvider": 37}``), where the runtime says.
    """

    outputs: list[Batch]
    output_names: list[str]
    info: str = ""
    seconds: float = 0.0
    ep_nodes: dict[str, int] = field(default_factory=dict)


def run_backend(
    backend: str, model_path: str, batches: Sequence[Batch], options: Mapping[str, str] | None = None
) -> BackendRun:
    """Run an ONNX file on one backend, in this process.

    Args:
        backend: one of :data:`BACKENDS`.
        model_path: path of the ONNX file.
        batches: input batches; each a list of arrays matched to the graph inputs by position.
        options: backend options (only for :data:`OPTION_BACKENDS`; see the module docstring).

    Returns:
        The outputs of every batch.

    Raises:
        BackendUnavailable: the backend is missing here or declines the model (a skip, with the reason).
        ValueError: unknown backend name, or options for a backend that takes none.
    """
    options = {str(k): str(v) for k, v in (options or {}).items()}
    if options and backend not in OPTION_BACKENDS:
        raise ValueError(f"backend {backend!r} takes no options (got {sorted(options)}); only "
                         f"{', '.join(OPTION_BACKENDS)} do")
    runners = {
        "onnxruntime": lambda: _run_onnxruntime(model_path, batches, optimize=True),
        "onnxruntime-noopt": lambda: _run_onnxruntime(model_path, batches, optimize=False),
        "openvino": lambda: _run_openvino(model_path, batches),
        "onnx-reference": lambda: _run_onnx_reference(model_path, batches),
        "qnn": lambda: _run_qnn(model_path, batches, options),
    }
    if backend not in runners:
        raise ValueError(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    return runners[backend]()


def _feeds(names: Sequence[str], batch: Batch, model_path: str) -> dict[str, np.ndarray]:
    if len(batch) != len(names):
        raise ValueError(
            f"{os.path.basename(model_path)} takes {len(names)} input(s) ({', '.join(names)}) but the batch "
            f"has {len(batch)} array(s); pass one array per graph input, in order"
        )
    return dict(zip(names, batch, strict=True))


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailable(f"onnxruntime is not installed: {INSTALL_HINTS['onnxruntime']}") from e
    return onnxruntime


def _run_onnxruntime(model_path: str, batches: Sequence[Batch], optimize: bool) -> BackendRun:
    ort = _import_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    sess = ort.InferenceSession(model_path, sess_options=so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    start = time.perf_counter()
    outputs = [list(sess.run(None, _feeds(names, b, model_path))) for b in batches]
    level = "ORT_ENABLE_ALL" if optimize else "ORT_DISABLE_ALL"
    return BackendRun(
        outputs,
        [o.name for o in sess.get_outputs()],
        f"onnxruntime {ort.__version__} CPUExecutionProvider, {level}",
        time.perf_counter() - start,
    )


def _run_openvino(model_path: str, batches: Sequence[Batch]) -> BackendRun:
    try:
        import openvino as ov
    except ImportError as e:
        raise BackendUnavailable(f"openvino is not installed: {INSTALL_HINTS['openvino']}") from e
    core = ov.Core()
    # f32: OpenVINO otherwise runs FP32 parts in bf16 on CPUs with avx512_bf16, hiding real QDQ errors.
    compiled = core.compile_model(core.read_model(model_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    names = [p.get_any_name() for p in compiled.inputs]
    start = time.perf_counter()
    outputs = []
    for b in batches:
        result = request.infer(_feeds(names, b, model_path))
        outputs.append([np.array(result[port]) for port in compiled.outputs])
    return BackendRun(
        outputs,
        [p.get_any_name() for p in compiled.outputs],
        f"openvino {ov.__version__} CPU, INFERENCE_PRECISION_HINT=f32",
        time.perf_counter() - start,
    )


def count_parameters(model) -> int:
    """Number of weight elements (initializers and Constant nodes) of an ``onnx.ModelProto``.

    Args:
        model: the ONNX model.

    Returns:
        The element count.
    """
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            total += sum(int(np.prod(a.t.dims)) for a in node.attribute if a.name == "value")
    return total


def _reference_dequantize_linear(model) -> list:
    """onnx.reference implements DequantizeLinear from opset 19 only; lend that kernel to opsets 10-18.

    Opset 19 only added float8 inputs and float16/bfloat16 scales, so for the int8/uint8/int32 inputs
    valid at opsets 10-18 the opset-19 kernel computes exactly the older operator.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 19)
    if opset >= 19:
        return []
    from onnx.reference.ops.op_dequantize_linear import DequantizeLinear_19

    class DequantizeLinear(DequantizeLinear_19):
        op_domain = ""

        def _run(self, x, x_scale, x_zero_point=None, axis: int = 1, **_later_attributes):
            # Unversioned, the class is handed the newest schema's attributes (block_size ...): unused here.
            return super()._run(x, x_scale, x_zero_point, axis=axis)

    return [DequantizeLinear]


def _run_onnx_reference(model_path: str, batches: Sequence[Batch]) -> BackendRun:
    try:
        import onnx
        from onnx.reference import ReferenceEvaluator
    except ImportError as e:
        raise BackendUnavailable(f"onnx is not installed: {INSTALL_HINTS['onnx-reference']}") from e
    model = onnx.load(model_path)
    n_params = count_parameters(model)
    if n_params > REFERENCE_MAX_PARAMS:
        raise BackendUnavailable(
            f"model has {n_params:,} parameters > {REFERENCE_MAX_PARAMS:,}: onnx.reference (pure numpy) "
            "would be too slow; compare with onnxruntime-noopt instead"
        )
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    evaluator = ReferenceEvaluator(model, new_ops=_reference_dequantize_linear(model))
    start = time.perf_counter()
    outputs = [[np.asarray(o) for o in evaluator.run(None, _feeds(names, b, model_path))] for b in batches]
    return BackendRun(
        outputs,
        [o.name for o in model.graph.output],
        f"onnx {onnx.__version__} ReferenceEvaluator",
        time.perf_counter() - start,
    )


# --- QNN (Qualcomm HTP, simulated on x86) --------------------------------------------------------------


def _strict(options: Mapping[str, str]) -> bool:
    value = options.get("strict", "1").strip().lower()
    if value not in ("0", "1", "true", "false"):
        raise ValueError(f"qnn option strict={value!r}: use 1 (CPU fallback disabled, the default) or 0")
    return value in ("1", "true")


def _qnn_session_options(ort, options: Mapping[str, str]):
    """SessionOptions with the QNN HTP EP added, for onnxruntime-qnn 2.x (plugin) or 1.x (built in)."""
    so = ort.SessionOptions()
    ep_options = {k: v for k, v in options.items() if k != "strict"}
    if _strict(options):
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        import onnxruntime_qnn
    except ImportError:
        onnxruntime_qnn = None
    if onnxruntime_qnn is not None and hasattr(ort, "register_execution_provider_library"):
        if not any(d.ep_name == "QNNExecutionProvider" for d in ort.get_ep_devices()):
            ort.register_execution_provider_library(
                "QNNExecutionProvider", onnxruntime_qnn.get_library_path()
            )
        devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
        if not devices:
            raise BackendUnavailable("onnxruntime-qnn is installed but exposes no QNN device")
        so.add_provider_for_devices(devices, {"backend_path": onnxruntime_qnn.get_qnn_htp_path(), **ep_options})
        return (
            so,
            None,
            f"onnxruntime {ort.__version__} + onnxruntime-qnn {onnxruntime_qnn.__version__} (plugin)",
        )
    if "QNNExecutionProvider" in ort.get_available_providers():
        providers = [("QNNExecutionProvider", {"backend_path": "libQnnHtp.so", **ep_options})]
        if not _strict(options):
            providers.append("CPUExecutionProvider")
        return so, providers, f"onnxruntime-qnn {ort.__version__} (built-in EP)"
    raise BackendUnavailable(
        f"QNNExecutionProvider is not available in {sys.executable}: {INSTALL_HINTS['qnn']}"
    )


def _qnn_session(ort, model_path: str, batch: Batch, options: Mapping[str, str]):
    so, providers, what = _qnn_session_options(ort, options)
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    # QNN HTP compiles static graphs only: pin every symbolic input dimension to this batch's size.
    probe = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    for spec, array in zip(probe.get_inputs(), batch, strict=False):
        for dim, size in zip(spec.shape, array.shape, strict=False):
            if isinstance(dim, str) and dim:
                so.add_free_dimension_override_by_name(dim, int(size))
    try:
        return ort.InferenceSession(model_path, sess_options=so, providers=providers), what
    except Exception as e:
        if not _strict(options) or "fallback to CPU EP" not in str(e):
            raise
        # Name the nodes the HTP refused: place the graph again with the fallback allowed.
        loose = _qnn_session(ort, model_path, batch, {**options, "strict": "0"})[0]
        line = _assignment_info(loose)[0]
        raise RuntimeError(
            f"the QNN HTP backend cannot run every node of {os.path.basename(model_path)} (strict run, CPU "
            f"fallback disabled): {line or e}. Quantize those ops for the qnn target (re-export with "
            "--target qnn and check the file with qtrim check --target qnn), or pass the qnn option strict=0 "
            "to let them run on the CPU"
        ) from None


def _assignment_info(sess) -> tuple[str, dict[str, int]]:
    """One line on node placement, and the node count per execution provider."""
    try:
        subgraphs = sess.get_provider_graph_assignment_info()
    except Exception:  # older onnxruntime: no assignment info
        return "", {}
    per_ep: dict[str, list[str]] = {}
    for sg in subgraphs:
        per_ep.setdefault(sg.ep_name, []).extend(f"{n.name} ({n.op_type})" for n in sg.get_nodes())
    parts = []
    for ep, nodes in per_ep.items():
        shown = (
            ""
            if ep == "QNNExecutionProvider"
            else ": " + ", ".join(nodes[:8]) + (" ..." if len(nodes) > 8 else "")
        )
        parts.append(f"{ep} {len(nodes)} node(s){shown}")
    return "; ".join(parts), {ep: len(nodes) for ep, nodes in per_ep.items()}


def _run_qnn(model_path: str, batches: Sequence[Batch], options: Mapping[str, str]) -> BackendRun:
    ort = _import_onnxruntime()
    sessions: dict[tuple, object] = {}
    outputs, seconds, what, assigned, counts = [], 0.0, "", "", {}
    for b in batches:
        key = tuple(a.shape for a in b)
        if key not in sessions:
            sessions[key], what = _qnn_session(ort, model_path, b, options)
            if not assigned:
                assigned, counts = _assignment_info(sessions[key])
        sess = sessions[key]
        names = [i.name for i in sess.get_inputs()]
        start = time.perf_counter()
        outputs.append(list(sess.run(None, _feeds(names, b, model_path))))
        seconds += time.perf_counter() - start
    sess = next(iter(sessions.values()))
    mode = "strict (CPU fallback disabled)" if _strict(options) else "CPU fallback allowed"
    shown = "".join(f", {k}={v}" for k, v in sorted(options.items()) if k != "strict")
    info = f"{what}, HTP backend, {mode}{shown}; " + (assigned or "providers " + ", ".join(sess.get_providers()))
    return BackendRun(outputs, [o.name for o in sess.get_outputs()], info, seconds, counts)


# --- worker entry point --------------------------------------------------------------------------------


def load_batches(path: str) -> list[Batch]:
    """Read ``b{batch}_{input}`` arrays from an .npz file.

    Args:
        path: the .npz file.

    Returns:
        Batches, each a list of arrays in input order.
    """
    with np.load(path, allow_pickle=False) as data:
        keys = sorted(data.files, key=lambda k: tuple(int(p) for p in k[1:].split("_")))
        batches: list[Batch] = []
        for key in keys:
            bi, ii = (int(p) for p in key[1:].split("_"))
            while len(batches) <= bi:
                batches.append([])
            assert ii == len(batches[bi]), f"missing array b{bi}_{len(batches[bi])} in {path}"
            batches[bi].append(data[key])
    return batches


def save_batches(path: str, batches: Sequence[Batch]) -> None:
    """Write batches as ``b{batch}_{index}`` arrays to an .npz file.

    Args:
        path: the .npz file.
        batches: lists of arrays.
    """
    np.savez(path, **{f"b{bi}_{ii}": np.asarray(a) for bi, b in enumerate(batches) for ii, a in enumerate(b)})


def ir_version_hint(message: str) -> str:
    """Append the fix to an onnxruntime "unsupported IR version" message.

    Args:
        message: an error message.

    Returns:
        The message, with a hint when it is about the IR version.
    """
    if "IR version" in message or "ir_version" in message:
        return message + " (re-save the model with model.ir_version = 10, which every runtime here loads)"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Worker command line: run one backend on the batches of an .npz file.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0 (the outcome is in the result JSON), 2 on a bad command line.
    """
    parser = argparse.ArgumentParser(description="Run an ONNX model on one backend (qtrim_fx.verify worker).")
    parser.add_argument("--backend", required=True, choices=BACKENDS)
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--outputs", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a backend option (repeatable), e.g. soc_model=60 for qnn")
    args = parser.parse_args(argv)
    bad = [o for o in args.option if "=" not in o]
    if bad:
        parser.error(f"--option takes KEY=VALUE, got {bad[0]!r}")
    options = dict(o.split("=", 1) for o in args.option)
    result: dict = {"status": "ok", "message": "", "info": "", "output_names": [], "seconds": 0.0, "ep_nodes": {}}
    try:
        run = run_backend(args.backend, args.model, load_batches(args.inputs), options)
        save_batches(args.outputs, run.outputs)
        result.update(info=run.info, output_names=run.output_names, seconds=run.seconds, ep_nodes=run.ep_nodes)
    except BackendUnavailable as e:
        result.update(status="skipped", message=str(e))
    except Exception as e:
        result.update(status="error", message=ir_version_hint(f"{type(e).__name__}: {e}"))
        traceback.print_exc()
    result["python"] = sys.executable
    with open(args.result, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
