"""Read an untrusted ONNX file safely and ask ``onnx.checker`` whether it is valid ONNX at all.

:func:`qtrim_fx.onnx.check` runs these before its target rules. Each problem comes back as a
:class:`Finding` (``rule``, ``node``, ``message``; :func:`~qtrim_fx.onnx.check` turns them into
error violations) instead of an exception, so a broken file is reported, never passed:

``invalid_model``
    the bytes are not an ONNX protobuf (truncated, corrupted, another format), or
    ``onnx.checker.check_model(full_check=True)`` rejects the model (a cycle or unsorted
    graph, an input nothing produces, a type or shape error, an unknown attribute, ...).
``external_data``
    a tensor stored outside the ``.onnx`` file whose location is absolute or leaves the
    model's folder (``../``, or a symlink out of it), names a missing file or one too short
    for the tensor, or something that is not a regular file (a FIFO or device: reading it
    could block forever). onnx, ONNX Runtime and OpenVINO refuse such files; onnx-ir would
    follow them, so nothing here opens an external file before it passed these tests.

The model file itself is only read when it is a regular file. ``onnx.checker`` insists on a
shape for every main-graph output; a file without one still loads in every runtime (the rank
is unknown), so an output without a shape gets the inferred one before the checker runs.
"""

from __future__ import annotations

import contextlib
import logging
import ntpath
import os
import re
import stat
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto

from qtrim_fx.core.errors import ConfigError
from qtrim_fx.core.fileio import file_kind, require_regular_input

__all__ = [
    "Finding",
    "checker_findings",
    "external_data_findings",
    "external_tensors",
    "quiet_onnx_ir",
    "read_untrusted",
]

#: sub-byte element types: bits per element (everything else takes its numpy itemsize).
_SUB_BYTE_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}
_MESSAGE_LIMIT = 400
_NODE_IN_MESSAGE = re.compile(r"(?:node name|Name|name): ([^\s,()]+)")


class Finding(NamedTuple):
    """One reason a file is not valid ONNX (the fields of a :class:`~qtrim_fx.onnx.Violation`)."""

    rule: str
    node: str
    message: str


def _one_line(text: object, limit: int = _MESSAGE_LIMIT) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_untrusted(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto | None, list[Finding]]:
    """Parse an ONNX file without loading its external data, and vet every external data reference.

    Args:
        path: the ``.onnx`` file.

    Returns:
        ``(model, findings)``: ``model`` is ``None`` when the bytes do not parse (then ``findings``
        says so); ``findings`` also lists every bad external data reference (see the module
        docstring). The external files are not opened, only their metadata read.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: ``path`` is not a regular file (a folder, FIFO or device).
    """
    path = os.fspath(path)
    require_regular_input(path, "ONNX file", "pass the path of an .onnx file")
    try:
        model = onnx.load_model(path, load_external_data=False)
    except Exception as e:  # protobuf DecodeError, a textproto/json parse error, ...
        return None, [Finding("invalid_model", "<model>", f"{path} does not parse as an ONNX model "
                              f"({type(e).__name__}: {_one_line(e, 200)}): the file is truncated, corrupted "
                              "or not ONNX; export or download it again")]
    return model, external_data_findings(model, os.path.dirname(os.path.abspath(path)))


# -- external data ---------------------------------------------------------------------------
def _graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
        for sparse in attr.sparse_tensors:
            yield from (sparse.values, sparse.indices)
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for sub in attr.graphs:
            yield from _graph_tensors(sub)


def external_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    """Every tensor of the model (graph, subgraphs, attributes, functions) stored in an external file."""
    tensors = [*_graph_tensors(model.graph)]
    for function in model.functions:
        for node in function.node:
            tensors.extend(_node_tensors(node))
    return [t for t in tensors if t.data_location == TensorProto.EXTERNAL]


def _nbytes(tensor: TensorProto) -> int | None:
    count = int(np.prod([int(d) for d in tensor.dims], dtype=np.float64)) if tensor.dims else 1
    name = TensorProto.DataType.Name(tensor.data_type) if tensor.data_type in TensorProto.DataType.values() else ""
    if name in _SUB_BYTE_BITS:
        return -(-count * _SUB_BYTE_BITS[name] // 8)
    if name in ("", "UNDEFINED", "STRING"):
        return None
    try:
        return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _location_problem(tensor: TensorProto, base_dir: str | None) -> str | None:
    """Why this external reference must not be followed, or None when it is safe to read."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    if not location:
        return "has no 'location' entry"
    parts = location.replace("\\", "/").split("/")
    if os.path.isabs(location) or ntpath.isabs(location) or ntpath.splitdrive(location)[0]:
        return f"location {location!r} is an absolute path; it must be relative to the model's folder"
    if ".." in parts:
        return f"location {location!r} leaves the model's folder ('..')"
    if "\0" in location:
        return f"location {location!r} holds a NUL character"
    try:
        offset, length = int(info.get("offset", 0)), (int(info["length"]) if "length" in info else None)
    except ValueError:
        return f"offset/length {info.get('offset')!r}/{info.get('length')!r} are not integers"
    if offset < 0 or (length is not None and length < 0):
        return f"negative offset/length {offset}/{length}"
    if base_dir is None:
        return None  # an in-memory model: where the file would be is unknown
    full = os.path.join(base_dir, location)
    real_base = os.path.realpath(base_dir)
    if os.path.commonpath([os.path.realpath(full), real_base]) != real_base:
        return f"location {location!r} is a link that leads out of the model's folder"
    try:
        st = os.stat(full)
    except OSError as e:
        return f"file {location!r} cannot be found next to the model ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"{location!r} is {file_kind(st.st_mode)}, not a regular file; reading it could block forever"
    need = _nbytes(tensor)
    have = max(0, st.st_size - offset) if length is None else min(length, max(0, st.st_size - offset))
    if need is not None and have < need:
        return (f"file {location!r} holds {have} byte(s) from offset {offset}, the tensor's shape "
                f"{list(tensor.dims)} needs {need}")
    return None


def external_data_findings(model: onnx.ModelProto, base_dir: str | None) -> list[Finding]:
    """Every external data reference that no runtime would follow (one finding per problem).

    Args:
        model: a model loaded without its external data.
        base_dir: the folder of the ``.onnx`` file; ``None`` for an in-memory model (then only the
            locations themselves are vetted).

    Returns:
        ``external_data`` findings, node = the first tensor with that problem.
    """
    grouped: dict[str, list[str]] = {}
    for tensor in external_tensors(model):
        problem = _location_problem(tensor, base_dir)
        if problem is not None:
            grouped.setdefault(problem, []).append(tensor.name)
    findings = []
    for problem, names in grouped.items():
        more = f" (and {len(names) - 1} more tensor(s))" if len(names) > 1 else ""
        findings.append(Finding("external_data", names[0] or "<tensor>", f"external data {problem}{more}; "
                                "onnx, ONNX Runtime and OpenVINO refuse it: keep the data file(s) inside the "
                                "model's folder, or re-save with onnx.save_model(..., save_as_external_data=True)"))
    return findings


# -- onnx.checker ----------------------------------------------------------------------------
def _with_output_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose main-graph outputs without a shape get the inferred one (or rank 0 when unknown)."""
    missing = [o.name for o in model.graph.output
               if o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape")]
    if not missing:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(copy).graph.output}
    except Exception:  # the strict run below reports what is wrong
        inferred = {}
    for out in copy.graph.output:
        if out.name in missing:
            found = inferred.get(out.name)
            if found is not None and found.type.tensor_type.HasField("shape"):
                out.type.tensor_type.shape.CopyFrom(found.type.tensor_type.shape)
            else:
                out.type.tensor_type.shape.SetInParent()  # only to satisfy the field check
    return copy


def _inline_external_initializers(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy whose external initializers are graph inputs instead (None if any other tensor is external).

    The checker resolves external files against the working folder when it gets a proto; their
    locations were vetted by :func:`external_data_findings` already.
    """
    top = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if len(top) != len(external_tensors(model)):
        return None
    if not top:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inputs = {i.name for i in copy.graph.input}
    kept = [t for t in copy.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    copy.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                            for t in top if t.name not in inputs)
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    return copy


def checker_findings(model: onnx.ModelProto, path: str | None = None) -> list[Finding]:
    """``onnx.checker.check_model(full_check=True)`` (structure, types, strict shape inference).

    Args:
        model: the model, loaded without external data.
        path: its file, if any: used when external tensors sit elsewhere than in top-level
            initializers (the checker then re-reads the file to locate them).

    Returns:
        One ``invalid_model`` finding naming the checker's first complaint, or nothing.

    Raises:
        ConfigError: an in-memory model with external tensors the checker cannot locate.
    """
    checked: onnx.ModelProto | str | None = _inline_external_initializers(model)
    if checked is None:
        if path is None:
            raise ConfigError("this in-memory model keeps tensors of Constant nodes or subgraphs in external "
                              "files that cannot be located; pass the .onnx file's path to check() instead")
        checked = path
    else:
        checked = _with_output_shapes(checked)
        if checked.ByteSize() > onnx.checker.MAXIMUM_PROTOBUF:
            if path is None:
                return [Finding("invalid_model", "<model>", "the model is larger than 2 GB in memory, too large "
                                "for onnx.checker; save it with external data and check the file instead")]
            checked = path
    try:
        onnx.checker.check_model(checked, full_check=True)
    except Exception as e:  # ValidationError, InferenceError, or a C++ error on a malformed proto
        text = _one_line(e)
        where = _NODE_IN_MESSAGE.search(text)
        return [Finding("invalid_model", where.group(1) if where else "<model>",
                        f"onnx.checker rejects the model: {text.rstrip('. ')}. Runtimes refuse such a file "
                        "or compute garbage with it; fix the tool that wrote it and export again")]
    return []


@contextlib.contextmanager
def quiet_onnx_ir() -> Iterator[None]:
    """Silence onnx-ir's per-node warnings while reading a model already reported as invalid."""
    logger = logging.getLogger("onnx_ir")

    def drop(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    loggers = [logger, *(logging.getLogger(n) for n in ("onnx_ir.serde", "onnx_ir._core"))]
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)
