"""Mutation fuzzing of ``check`` / ``qtrim check`` on broken copies of real QDQ exports.

Three valid exports (tiny_convnet for onnxruntime and tensorrt, tiny_mlp for qnn) are mutated in
about 100 deterministic ways each: truncations, bit flips, scales set to 0 / NaN / -1 / 1e-45 /
inf, zero points of another type or removed, inputs nothing produces, removed initializers,
cycles, unsorted nodes, the Q/DQ stripped (a float model), opset / IR version edits, type edits,
and external data that is absolute, escapes the folder or is a FIFO.

Every mutant goes to the CLI entry (``main(["check", ...])``) and to ``qtrim_fx.onnx.check``.
Whether a mutant is valid is decided independently of ``check``'s rules: it parses, passes
``onnx.checker`` (full check), ONNX Runtime builds a session for it, it has Q/DQ nodes and every
Q/DQ scale is positive, finite and normal. An invalid mutant must give a non-zero exit (1 or 2)
and an error violation; a valid one may pass. Exit 3 (an unexpected failure) and hangs are bugs.

This complements ``test_fuzz.py`` (random *networks* through the export): here the files are
hostile, the networks fixed.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from qtrim_fx.models import get_model

import qtrim_fx
from qtrim_fx.onnx import check
from qtrim_fx.tools.cli import main

BASES = (("tiny_convnet", "onnxruntime"), ("tiny_convnet", "tensorrt"), ("tiny_mlp", "qnn"))
QDQ = ("QuantizeLinear", "DequantizeLinear")
BAD_SCALES = (0.0, float("nan"), -1.0, 1e-45, float("inf"))
MIN_MUTANTS_PER_BASE = 90


@dataclass
class Mutant:
    label: str
    write: Callable[[str], str]  # folder -> path of the .onnx file written there
    invalid: bool = False  # known invalid by construction (external data nobody may follow)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> list[tuple[str, onnx.ModelProto]]:
    tmp = tmp_path_factory.mktemp("fuzz_bases")
    out = []
    for name, target in BASES:
        model, (x,) = get_model(name, batch_size=2)
        qm = qtrim_fx.prepare(model)
        qtrim_fx.calibrate(qm, [x])
        path = tmp / f"{name}.{target}.onnx"
        qtrim_fx.export_onnx(qm, (x,), path, target=target)
        out.append((target, onnx.load(path)))
    return out


# -- mutations ---------------------------------------------------------------------------------
def _bytes(data: bytes) -> Callable[[str], str]:
    def write(folder: str) -> str:
        path = os.path.join(folder, "m.onnx")
        with open(path, "wb") as f:
            f.write(data)
        return path

    return write


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _edited(model: onnx.ModelProto, edit: Callable[[onnx.ModelProto], None]) -> Callable[[str], str]:
    m = _copy(model)
    edit(m)
    return _bytes(m.SerializeToString())


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _set_scale(name: str, value: float) -> Callable[[onnx.ModelProto], None]:
    def edit(m: onnx.ModelProto) -> None:
        tensor = _init(m, name)
        array = numpy_helper.to_array(tensor).copy()
        array.flat[0] = value
        tensor.CopyFrom(numpy_helper.from_array(array.astype(array.dtype), name))

    return edit


def _retype_zero_point(name: str, dtype: type) -> Callable[[onnx.ModelProto], None]:
    def edit(m: onnx.ModelProto) -> None:
        tensor = _init(m, name)
        array = numpy_helper.to_array(tensor).astype(dtype)
        if dtype is np.float32:
            array.flat[0] = np.nan
        tensor.CopyFrom(numpy_helper.from_array(array, name))

    return edit


def _zero_point_min(name: str) -> Callable[[onnx.ModelProto], None]:
    def edit(m: onnx.ModelProto) -> None:
        tensor = _init(m, name)
        array = numpy_helper.to_array(tensor).copy()
        array.flat[0] = np.iinfo(array.dtype).min if array.dtype.kind in "iu" else 0
        tensor.CopyFrom(numpy_helper.from_array(array, name))

    return edit


def _float_model(m: onnx.ModelProto) -> None:
    """Drop every Q/DQ: consumers read the float tensor (or the dequantized weight) instead."""
    producer = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name: t for t in m.graph.initializer}
    source: dict[str, str] = {}
    for node in m.graph.node:
        if node.op_type == "QuantizeLinear":
            source[node.output[0]] = node.input[0]
        elif node.op_type == "DequantizeLinear":
            x = node.input[0]
            if x in inits:
                q = numpy_helper.to_array(inits[x]).astype(np.float32)
                s = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                if s.ndim == 1:
                    s = s.reshape([-1 if d == axis % q.ndim else 1 for d in range(q.ndim)])
                m.graph.initializer.append(numpy_helper.from_array(q * s, node.output[0] + "_float"))
                source[node.output[0]] = node.output[0] + "_float"
            else:
                source[node.output[0]] = source.get(x, x) if x in producer else x
    kept = [n for n in m.graph.node if n.op_type not in QDQ]
    for n in kept:
        for i, name in enumerate(n.input):
            while name in source:
                name = source[name]
            n.input[i] = name
    for out in m.graph.output:
        name = out.name
        while name in source:
            name = source[name]
        if name != out.name:  # an output written by a DQ: copy the float tensor
            kept.append(helper.make_node("Identity", [name], [out.name], name=f"{out.name}/Identity"))
    del m.graph.node[:]
    m.graph.node.extend(kept)


def _external(model: onnx.ModelProto, location: str) -> Callable[[str], str]:
    def write(folder: str) -> str:
        path = os.path.join(folder, "m.onnx")
        onnx.save_model(_copy(model), path, save_as_external_data=True, location="m.data", size_threshold=0)
        m = onnx.load(path, load_external_data=False)
        for tensor in m.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        if location == "pipe":
            os.mkfifo(os.path.join(folder, "pipe"))
        elif location.startswith("../"):
            os.replace(os.path.join(folder, "m.data"), os.path.join(folder, location))
        onnx.save(m, path)
        return path

    return write


def mutants(model: onnx.ModelProto, seed: int) -> Iterator[Mutant]:
    """~100 deterministic mutants of one model."""
    data = model.SerializeToString()
    n = len(data)
    rng = np.random.default_rng(seed)
    graph = model.graph
    nodes = list(graph.node)
    inits = {t.name for t in graph.initializer}
    qdq = [nd for nd in nodes if nd.op_type in QDQ]
    scales = list(dict.fromkeys(nd.input[1] for nd in qdq if nd.input[1] in inits))
    zps = list(dict.fromkeys(nd.input[2] for nd in qdq if len(nd.input) > 2 and nd.input[2] in inits))

    for cut in sorted({0, 1, 2, 8, 16, n // 8, n // 4, n // 3, n // 2, 2 * n // 3, 3 * n // 4, 7 * n // 8,
                       n - 16, n - 2, n - 1}):
        yield Mutant(f"truncate@{cut}", _bytes(data[:cut]))
    for _ in range(30):
        pos, bit = int(rng.integers(0, n)), int(rng.integers(0, 8))
        flipped = bytearray(data)
        flipped[pos] ^= 1 << bit
        yield Mutant(f"bitflip@{pos}.{bit}", _bytes(bytes(flipped)))
    for name in [scales[int(i)] for i in rng.choice(len(scales), min(4, len(scales)), replace=False)]:
        for value in BAD_SCALES:
            yield Mutant(f"scale {name}={value}", _edited(model, _set_scale(name, value)))
    for name in zps[:3]:
        yield Mutant(f"zero point {name} as float NaN", _edited(model, _retype_zero_point(name, np.float32)))
        yield Mutant(f"zero point {name} as int32", _edited(model, _retype_zero_point(name, np.int32)))
        yield Mutant(f"zero point {name} = dtype min", _edited(model, _zero_point_min(name)))
    for k in (0, len(qdq) // 2):
        def drop_zp(m: onnx.ModelProto, k: int = k) -> None:
            node = [nd for nd in m.graph.node if nd.op_type in QDQ][k]
            del node.input[2:]
        yield Mutant(f"no zero point on Q/DQ #{k}", _edited(model, drop_zp))
    for i in np.linspace(0, len(nodes) - 1, 5).astype(int):
        def dangle(m: onnx.ModelProto, i: int = int(i)) -> None:
            m.graph.node[i].input[0] = f"nothing_produces_this_{i}"
        yield Mutant(f"dangling input of node {i}", _edited(model, dangle))
    for name in [sorted(inits)[int(i)] for i in np.linspace(0, len(inits) - 1, 5).astype(int)]:
        def remove(m: onnx.ModelProto, name: str = name) -> None:
            keep = [t for t in m.graph.initializer if t.name != name]
            del m.graph.initializer[:]
            m.graph.initializer.extend(keep)
        yield Mutant(f"initializer {name} removed", _edited(model, remove))
    for i, j in ((0, len(nodes) - 1), (1, len(nodes) // 2), (len(nodes) // 3, 2 * len(nodes) // 3), (2, 3)):
        def cycle(m: onnx.ModelProto, i: int = i, j: int = j) -> None:
            m.graph.node[i].input[0] = m.graph.node[j].output[0]
        yield Mutant(f"cycle node {i} <- node {j}", _edited(model, cycle))
    yield Mutant("nodes reversed", _edited(model, lambda m: m.graph.node.reverse()))
    order = rng.permutation(len(nodes))
    def shuffle(m: onnx.ModelProto) -> None:
        shuffled = [_copy_node(m.graph.node[int(i)]) for i in order]
        del m.graph.node[:]
        m.graph.node.extend(shuffled)
    yield Mutant("nodes shuffled", _edited(model, shuffle))
    yield Mutant("Q/DQ stripped (float model)", _edited(model, _float_model))
    for version in (1, 9, 99):
        def opset(m: onnx.ModelProto, version: int = version) -> None:
            m.opset_import[0].version = version
        yield Mutant(f"opset {version}", _edited(model, opset))
    for version in (0, 99):
        def ir_version(m: onnx.ModelProto, version: int = version) -> None:
            m.ir_version = version
        yield Mutant(f"ir_version {version}", _edited(model, ir_version))
    def output_type(m: onnx.ModelProto) -> None:
        m.graph.output[0].type.tensor_type.elem_type = TensorProto.INT8
    yield Mutant("output declared int8", _edited(model, output_type))
    def input_rank(m: onnx.ModelProto) -> None:
        m.graph.input[0].type.tensor_type.shape.dim.add().dim_value = 7
    yield Mutant("input rank + 1", _edited(model, input_rank))
    def axis(m: onnx.ModelProto) -> None:
        node = next(nd for nd in m.graph.node if nd.op_type == "DequantizeLinear" and nd.input[0] in inits)
        node.attribute.append(helper.make_attribute("axis", 7))
    yield Mutant("weight DQ axis 7", _edited(model, axis))
    for location in ("/etc/hostname", "../outside.data", "pipe"):
        yield Mutant(f"external data at {location}", _external(model, location), invalid=True)


def _copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


# -- the independent judge -------------------------------------------------------------------
def _valid(path: str) -> bool:
    """Parses, passes onnx.checker (full), ORT builds a session, has Q/DQ, every scale sane."""
    try:
        model = onnx.load(path, load_external_data=False)
        onnx.checker.check_model(path, full_check=True)
    except Exception:
        return False
    inits = {t.name: t for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in QDQ]
    if not qdq:
        return False
    for node in qdq:
        if node.input[1] in inits:
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            if not np.all(np.isfinite(scale) & (scale >= np.finfo(np.float32).tiny)):
                return False
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


def _cli(path: str, target: str) -> tuple[int, str]:
    return _run_cli(["check", path, "--target", target])


def _run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    return code, out.getvalue()


def _runs(path: str) -> bool:
    """What ``verify`` needs of a file: it parses, passes onnx.checker (full), ORT loads it, and its
    Q/DQ scales are sane (a zero, negative or non-finite scale computes garbage)."""
    return _valid(path) or (_loads(path) and not any(n.op_type in QDQ for n in onnx.load(path).graph.node))


def _loads(path: str) -> bool:
    try:
        onnx.checker.check_model(path, full_check=True)
        options = ort.SessionOptions()
        options.log_severity_level = 4
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


@pytest.mark.timeout(120)
@pytest.mark.parametrize("index", range(len(BASES)))
def test_mutants_never_pass_invalid_never_crash(bases, index, tmp_path):
    target, model = bases[index]
    problems, counts = [], {"invalid": 0, "valid": 0}
    start = time.perf_counter()
    all_mutants = list(mutants(model, seed=index))
    assert len(all_mutants) >= MIN_MUTANTS_PER_BASE
    for k, mutant in enumerate(all_mutants):
        folder = tmp_path / f"m{k}"
        folder.mkdir()
        path = mutant.write(str(folder))
        invalid = mutant.invalid or not _valid(path)
        counts["invalid" if invalid else "valid"] += 1
        code, out = _cli(path, target)
        if code == 3 or (invalid and code == 0) or code not in (0, 1, 2):
            problems.append(f"{mutant.label}: exit {code} ({'invalid' if invalid else 'valid'}): {out[-300:]}")
        try:
            found = check(path, target)
        except Exception as e:
            problems.append(f"{mutant.label}: check() raised {type(e).__name__}: {e}")
            continue
        if invalid and not any(v.severity == "error" for v in found):
            problems.append(f"{mutant.label}: invalid, yet check() found no error: {found}")
    elapsed = time.perf_counter() - start
    print(f"{BASES[index]}: {len(all_mutants)} mutants ({counts}) in {elapsed:.1f} s")
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("index", range(len(BASES)))
def test_verify_on_mutants_never_passes_a_broken_file_never_crashes(bases, index, tmp_path):
    """``qtrim verify MUTANT --reference ORIGINAL``: exit 0 only for a file that runs correctly."""
    _target, model = bases[index]
    reference = str(tmp_path / "reference.onnx")
    onnx.save(model, reference)
    problems, counts = [], {"broken": 0, "runs": 0}
    for k, mutant in enumerate(mutants(model, seed=index)):
        folder = tmp_path / f"m{k}"
        folder.mkdir()
        path = mutant.write(str(folder))
        broken = mutant.invalid or not _runs(path)
        counts["broken" if broken else "runs"] += 1
        code, out = _run_cli(["verify", path, "--reference", reference, "--backends", "onnxruntime",
                              "--batches", "1"])
        if code == 3 or (broken and code == 0) or code not in (0, 1, 2):
            problems.append(f"{mutant.label}: verify exit {code} ({'broken' if broken else 'runs'}): {out[-300:]}")
    print(f"{BASES[index]}: verify on {sum(counts.values())} mutants ({counts})")
    assert sum(counts.values()) >= MIN_MUTANTS_PER_BASE
    assert not problems, "\n".join(problems)
