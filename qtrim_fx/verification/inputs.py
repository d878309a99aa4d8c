"""Inputs and the reference for :func:`qtrim_fx.verification.run.verify`.

Untrusted files are checked before they are opened (regular files only), generated inputs are
capped (:data:`MAX_GENERATED_ELEMENTS`), and a torch reference is run twice on its first batch to
warn when it is not reproducible.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from qtrim_fx.core.errors import ConfigError, QtrimError
from qtrim_fx.core.fileio import require_regular_input
from qtrim_fx.verification import backend_worker as worker
from qtrim_fx.verification.backend_worker import Batch

__all__ = [
    "MAX_GENERATED_ELEMENTS",
    "random_inputs",
    "read_graph_inputs",
    "require_regular_file",
    "run_reference",
    "to_numpy_batches",
]

#: most values :func:`random_inputs` draws for one batch, all inputs together (2**26: 256 MiB of float32).
MAX_GENERATED_ELEMENTS = 2**26
#: a torch reference whose two runs on the same batch differ beyond this (relative to its largest
#: output) is reported as not reproducible.
_REPRODUCIBLE_RTOL = 1e-4


def require_regular_file(path: str, what: str) -> None:
    """FileNotFoundError when missing, ConfigError when a folder, FIFO or device (reading it could block)."""
    require_regular_input(path, what, "pass an .onnx file")


def read_graph_inputs(model_path: str):
    import onnx

    try:
        model = onnx.load(model_path, load_external_data=False)
    except Exception as e:  # protobuf DecodeError on a truncated or foreign file
        message = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ConfigError(f"{model_path} does not parse as an ONNX model ({message}); it is truncated, "
                          "corrupted or not ONNX: run `qtrim check` on it, or export it again") from None
    initializers = {t.name for t in model.graph.initializer}
    return model, [i for i in model.graph.input if i.name not in initializers]


def to_numpy_batches(inputs, graph_inputs, model_path: str) -> list[Batch]:
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
            elif a.dtype != want and np.can_cast(a.dtype, want, "safe") and not np.issubdtype(want, np.floating):
                a = a.astype(want)  # int32 token ids for an int64 input: lossless
            elif a.dtype != want:
                raise ConfigError(
                    f"batch {bi}, input {spec.name!r} holds {a.dtype} values but {model_path} takes {np.dtype(want)}; "
                    f"pass {np.dtype(want)} data (e.g. x.float() for images, x.long() for token ids)"
                )
            _check_shape(a, spec, bi, model_path)
            arrays.append(a)
        batches.append(arrays)
    if not batches:
        raise ConfigError("inputs is empty: pass a list of input batches (tensors or tuples of tensors)")
    return batches


def _check_shape(a: np.ndarray, spec, batch_index: int, model_path: str) -> None:
    """Refuse an array whose rank or fixed dimensions differ from the graph input's (a named or unknown one
    takes any size): every runtime would refuse it, each with its own message."""
    tensor_type = spec.type.tensor_type
    if not tensor_type.HasField("shape"):
        return
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    want = "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
    if len(dims) != a.ndim or any(d is not None and d != n for d, n in zip(dims, a.shape, strict=False)):
        raise ConfigError(
            f"batch {batch_index}, input {spec.name!r} has shape {tuple(a.shape)} but {model_path} takes {want} "
            "(? = any size); pass inputs shaped like the ones the file was exported with"
        )


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
    require_regular_file(path, "ONNX model")
    if num_batches < 1 or batch_size < 1:
        raise ConfigError(f"num_batches={num_batches} and batch_size={batch_size} must both be at least 1")
    _, graph_inputs = read_graph_inputs(path)
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
            outputs = []
            for i, b in enumerate(batches):
                try:
                    outputs.append(run(b))
                except (QtrimError, torch.OutOfMemoryError):
                    raise
                except Exception as e:  # the torch reference does not take the inputs the ONNX file takes
                    why = f"{type(e).__name__}: {e}".splitlines()[0]
                    got = ", ".join(f"{a.dtype} {tuple(a.shape)}" for a in b)
                    raise ConfigError(
                        f"the torch reference {type(module).__name__} does not run on batch {i} ({why}); the batch "
                        f"holds {got}; pass the reference that takes the ONNX file's inputs (the model it was "
                        "exported from), or its FP32 ONNX file"
                    ) from e
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


def run_reference(reference, batches: Sequence[Batch]) -> tuple[list[Batch], str]:
    if isinstance(reference, torch.nn.Module):
        return _run_torch(reference, batches), f"torch {type(reference).__name__} (eval, no grad)"
    if isinstance(reference, str | os.PathLike):
        path = os.fspath(reference)
        require_regular_file(path, "reference ONNX file")
        try:
            run = worker.run_backend("onnxruntime-noopt", path, batches)
        except Exception as e:  # the reference and the model disagree on their inputs, or it is broken
            why = f"{type(e).__name__}: {e}".splitlines()[0]
            raise ConfigError(f"the reference {path} does not run on the inputs of the model under test ({why}); "
                              "pass a reference with the same graph inputs (names, ranks, dtypes)") from e
        return run.outputs, f"{path} (onnxruntime, ORT_DISABLE_ALL)"
    raise TypeError(
        f"reference must be a torch nn.Module or the path of an FP32 ONNX file, not {type(reference).__name__}"
    )
