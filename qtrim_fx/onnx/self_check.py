"""Export checks itself: the written file, run by ONNX Runtime, against the lowered model it came from.

::

    lowered GraphModule ──export──▶ file.onnx
          │                            │ ONNX Runtime, graph optimizations disabled (ORT_DISABLE_ALL)
          ▼ torch, eval(), no_grad      ▼
       reference outputs  ◀─compare─▶ file outputs     disagree beyond rounding: ExportError, file removed

Both sides compute the same integer grids, so they may differ only where a value lands within float
error of a rounding boundary (x / s = k + 0.5 ± 1e-7): that element moves by one step of its site
and the step propagates. Such flips are rare (the float error, ~1e-7 of a value, against a step of
~1/255 of its range) and each moves an output by about one step of the last quantized tensor
before it. A semantic mismatch (an op dropped or changed, a wrong scale or zero point) moves most
elements, or a few by many steps. So, per output:

* ``unit``: how far one flip moves the output. When a DequantizeLinear produces it, its step. For a
  float output, from the quantized tensors the producing op reads: a flip of an activation by its
  step ``s`` moves a weighted op's output by ``s · |w|``, so ``s · max|W|`` (an elementwise op: ``s``).
  Never below 1 % of the reference's RMS (one step of an 8-bit grid over ±3σ is 2.4 % of σ);
* an element is **off** when ``|ort - torch| > unit`` (the unit is at least 1e-5 of the output's range:
  float slack); integer outputs are off when not equal, except indices from topk / argmax / argmin /
  sort that select equal values (ties, frequent among quantized values, are broken either way);
* an output fails the first test when more than :data:`MAX_OFF_SHARE` (1 %) of its elements are off,
  or any element is off by more than :data:`MAX_OFF_UNITS` (16) units.

Deep nets cascade flips: one flip moves the next layer's inputs across further boundaries, and a
global pool mixes them all into every output. So an output that fails the first test is compared
with the model's own noise floor: the lowered model is run again with every quantizer's input moved
by 1e-6 and by 1e-5 (relative, random sign: ~8 and ~80 float32 ulps, the size of a kernel's
reordering error). The output **disagrees** only when its error is more than :data:`NOISE_FACTOR`
(4) times what those runs show, in RMS or in its largest element.

Measured (``benchmarks/self_check.py``: export, ORT without optimizations vs the lowered model, then
one activation DequantizeLinear given 1.5x its scale, as ``tests/onnx/test_self_check.py`` does):
torchvision resnet18 (random init, one calibration batch) for TensorRT: ORT error RMS 0.0174 on a
1.55 RMS output (39 dB), jittered runs 0.0179, so 0.97x the floor; corrupted: 0.534, 29.8x. The
test models (tiny_convnet, tiny_mlp, attention_block, convtranspose_net, cifar_resnet18,
mobilenet_small, vit_tiny_*) match to 0 units for onnxruntime, tensorrt and openvino.
"""

from __future__ import annotations

import contextlib
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import numpy_helper

from qtrim_fx.core.errors import ExportError
from qtrim_fx.onnx.unsigned_weights import host_u8s8_saturates
from qtrim_fx.runtime.prepared import INFO_ATTR
from qtrim_fx.runtime.qdq import is_quant_dequant

__all__ = [
    "MAX_OFF_SHARE",
    "MAX_OFF_UNITS",
    "NOISE_FACTOR",
    "Disagreement",
    "compare_outputs",
    "refuse_value_branches",
    "verify_export",
]

#: share of an output's elements allowed more than one unit off (rounding flips are far rarer)
MAX_OFF_SHARE = 0.01
#: no element may be off by more than this many units (a flip moves an element by about one)
MAX_OFF_UNITS = 16.0
_FLOAT_UNIT = 0.01  # float outputs: unit = 1 % of the reference RMS (see the module doc)
#: an output within this many times its jittered runs' spread (RMS and largest element) is noise
NOISE_FACTOR = 4.0
_JITTER = (1e-6, 1e-5)  # relative moves of every quantizer input: ~8 and ~80 float32 ulps


@dataclass(frozen=True)
class Disagreement:
    """One output of the file that disagrees with the lowered model beyond rounding."""

    output: str
    off_share: float  # share of elements more than one unit off
    max_diff: float
    unit: float
    where: tuple[int, ...]  # index of the largest difference

    def __str__(self) -> str:
        return (f"output {self.output!r}: {100 * self.off_share:.2f}% of elements differ by more than one unit "
                f"({self.unit:.3g}); largest difference {self.max_diff:.4g} ({self.max_diff / self.unit:.1f} "
                f"units) at index {self.where}")


_PASS_THROUGH = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast"})


class _Constants:
    """Constant values of an ONNX graph (initializers and Constant nodes) and who produces each value."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.inits = {t.name: t for t in model.graph.initializer}
        self.consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.output}
        self.producer = {o: n for n in model.graph.node for o in n.output}

    def value(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name]).astype(np.float64)
        node = self.consts.get(name)
        if node is not None and node.attribute and node.attribute[0].HasField("t"):
            return numpy_helper.to_array(node.attribute[0].t).astype(np.float64)
        return None

    def dequantized(self, dq: onnx.NodeProto) -> tuple[float, float | None] | None:
        """(max scale, max |value| when the DequantizeLinear reads a constant, i.e. a weight)."""
        scale = self.value(dq.input[1]) if len(dq.input) > 1 else None
        if scale is None:
            return None
        q = self.value(dq.input[0])
        zp = self.value(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        wmax = None if q is None else float(np.max(np.abs(q - (0.0 if zp is None else np.max(zp))))) * float(
            np.max(np.abs(scale)))
        return float(np.max(np.abs(scale))), wmax


def _output_units(model: onnx.ModelProto) -> dict[str, float]:
    """Output name -> how far one rounding flip moves it.

    A DequantizeLinear output: its step. A float output: the op producing it (through reshapes) reads
    quantized tensors; a flip of one of its activations by a step ``s`` moves a weighted op's output
    by ``s · |w|`` (at most ``s · max|W|``) and an elementwise op's by ``s``.
    """
    g = _Constants(model)
    units = {}
    for out in model.graph.output:
        node = g.producer.get(out.name)
        while node is not None and node.op_type in _PASS_THROUGH and node.input:
            node = g.producer.get(node.input[0])
        if node is None:
            continue
        if node.op_type == "DequantizeLinear":
            found = g.dequantized(node)
            if found is not None:
                units[out.name] = found[0]
            continue
        acts, weights = [], []
        for i in node.input:
            dq = g.producer.get(i)
            found = g.dequantized(dq) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if found is not None:
                (weights if found[1] is not None else acts).append(found)
        if acts:
            step = max(s for s, _ in acts)
            units[out.name] = step * max(w for _, w in weights) if weights else step  # type: ignore[type-var]
    return units


def compare_outputs(
    names: Sequence[str],
    got: Sequence[np.ndarray],
    ref: Sequence[np.ndarray],
    units: dict[str, float],
    jittered: Sequence[Sequence[np.ndarray]] = (),
) -> list[Disagreement]:
    """The outputs where ``got`` (the file) and ``ref`` (the lowered model) disagree beyond rounding.

    Args:
        names, got, ref: output names, the file's outputs and the lowered model's.
        units: output name -> how far one rounding flip moves it (:func:`_output_units`); the unit used
            is the largest of that, 1 % of the reference's RMS and 1e-5 of its range.
        jittered: runs of the lowered model with every quantizer input moved by a few ulps
            (:func:`_jittered`): an output whose error stays within :data:`NOISE_FACTOR` times the
            spread these runs show (RMS and largest element) is rounding noise, not a disagreement.
    """
    bad = []
    for i, (name, g, r) in enumerate(zip(names, got, ref, strict=True)):
        g, r = np.asarray(g), np.asarray(r)
        if g.shape != r.shape:
            bad.append(Disagreement(f"{name} (shape {g.shape} vs {r.shape})", 1.0, float("inf"), 1.0, ()))
            continue
        if r.size == 0:
            continue
        if not np.issubdtype(r.dtype, np.floating):
            diff = (g != r).astype(np.float64)
            unit = 0.5
        else:
            g64, r64 = g.astype(np.float64), r.astype(np.float64)
            finite = np.isfinite(r64)
            diff = np.where(finite, np.abs(g64 - r64), np.where(np.isnan(r64), np.where(np.isnan(g64), 0.0, np.inf),
                                                                 np.where(g64 == r64, 0.0, np.inf)))
            diff = np.nan_to_num(diff, nan=np.inf)
            rf = r64[finite]
            rms = float(np.sqrt(np.mean(rf**2))) if rf.size else 0.0
            spread = float(np.ptp(rf)) if rf.size else 0.0
            unit = max(units.get(name, 0.0), _FLOAT_UNIT * rms, 1e-5 * spread, float(np.finfo(np.float32).tiny))
        off = diff > unit * (1.0 + 1e-3)
        share = float(off.mean())
        worst = float(diff.max())
        if (share > MAX_OFF_SHARE or worst > MAX_OFF_UNITS * unit) and not _within_noise(
                diff, r, [run[i] for run in jittered if i < len(run)]):
            where = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
            bad.append(Disagreement(name, share, worst, float(unit), where))
    return bad


def _within_noise(diff: np.ndarray, ref: np.ndarray, runs: Sequence[np.ndarray]) -> bool:
    """Whether ``diff`` is no larger than :data:`NOISE_FACTOR` times the jittered runs' own spread."""
    spread = [np.abs(np.asarray(j, np.float64) - ref.astype(np.float64)) for j in runs
              if np.shape(j) == ref.shape and np.issubdtype(np.asarray(j).dtype, np.floating)]
    if not spread or not np.all(np.isfinite(diff)):
        return False
    noise_rms = max(float(np.sqrt(np.mean(d**2))) for d in spread)
    noise_max = max(float(d.max()) for d in spread)
    rms = float(np.sqrt(np.mean(diff**2)))
    return noise_rms > 0 and rms <= NOISE_FACTOR * noise_rms and float(diff.max()) <= NOISE_FACTOR * noise_max


class _Jitter(fx.Interpreter):
    """Runs a lowered graph with every quantizer's data input moved by ``rel`` (relative, random sign)."""

    def __init__(self, gm: fx.GraphModule, rel: float, seed: int) -> None:
        super().__init__(gm)
        self.rel = rel
        self.gen = torch.Generator().manual_seed(seed)
        self.data = _input_dependent(gm.graph)

    def run_node(self, n: fx.Node) -> Any:
        if not (n.op == "call_function" and is_quant_dequant(n.target) and n.args and n.args[0] in self.data):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x * (1 + self.rel * torch.randn(x.shape, generator=self.gen, dtype=x.dtype))
        return n.target(x, *args[1:], **kwargs)


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _jittered(gm: torch.nn.Module, args: tuple[Any, ...]) -> list[list[np.ndarray]]:
    """The lowered model's outputs with float rounding moved at every quantizer (the noise floor)."""
    if not isinstance(gm, fx.GraphModule):
        return []
    runs = []
    was_training = gm.training
    try:
        gm.eval()
        for k, rel in enumerate(_JITTER):
            with torch.no_grad():
                out = _Jitter(gm, rel, seed=k).run(*args)
            runs.append([t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
                         for t in torch.utils._pytree.tree_leaves(out)])
    except Exception:
        return []
    finally:
        gm.train(was_training)
    return runs


def _reference(gm: torch.nn.Module, args: tuple[Any, ...]) -> list[np.ndarray]:
    was_training = gm.training
    try:
        with torch.no_grad():
            out = gm.eval()(*args)  # torch.onnx.export traces in eval(); compare like with like
    finally:
        gm.train(was_training)
    leaves = torch.utils._pytree.tree_leaves(out)
    return [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in leaves]


def _feeds(session: Any, gm: torch.nn.Module, args: tuple[Any, ...]) -> dict[str, np.ndarray] | None:
    """ONNX input name -> example input: by the forward's argument names, else in order."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    wanted = [i.name for i in session.get_inputs()]
    places = [n.name for n in gm.graph.nodes if n.op == "placeholder"] if hasattr(gm, "graph") else []
    by_name = {p: a for p, a in zip(places, args, strict=False) if isinstance(a, torch.Tensor)}
    if all(w in by_name for w in wanted):
        return {w: by_name[w].detach().cpu().numpy() for w in wanted}
    if len(wanted) == len(tensors):
        return {w: t.detach().cpu().numpy() for w, t in zip(wanted, tensors, strict=True)}
    return None


def _has_signed_weights(path: Path) -> bool:
    """The file stores some weight (a DequantizeLinear input initializer) as int8."""
    model = onnx.load(str(path), load_external_data=False)
    int8 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    return any(n.op_type == "DequantizeLinear" and n.input and n.input[0] in int8 for n in model.graph.node)


def verify_export(gm: torch.nn.Module, args: tuple[Any, ...], path: str | os.PathLike[str], *,
                  optimize: bool = False) -> None:
    """Run the written file on ONNX Runtime (no graph optimizations) against ``gm`` on ``args``.

    Args:
        gm: the lowered model that was exported.
        args: the example inputs it was exported with (positional).
        path: the written file.
        optimize: run ONNX Runtime with its default graph optimizations (``ORT_ENABLE_ALL``: fused integer
            kernels such as QLinearConv / QGemm, which requantize in fixed point) instead of none. Export
            checks the QDQ semantics (``False``); ``benchmarks/zoo.py --ort-optimize`` measures the fused
            kernels (RESULTS: within rounding on every zoo file but 3 of 320, 2-3 units off there).

    Raises:
        ExportError: the file disagrees with ``gm`` beyond rounding (see the module doc), or ONNX
            Runtime cannot run it; the file is removed first.
    """
    import onnxruntime as ort

    path = Path(path)
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        so.log_severity_level = 3
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feeds = _feeds(session, gm, args)
        if feeds is None:
            return  # inputs the file does not take one-to-one (folded constants): nothing to compare
        got = session.run(None, feeds)
    except Exception as e:
        _remove(path)
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise ExportError(f"ONNX Runtime cannot run the exported file on the example inputs ({why}); the file "
                          f"was removed. export_onnx(..., verify=False) writes it without this check") from e
    ref = _reference(gm, args)
    names = [o.name for o in session.get_outputs()]
    if len(ref) != len(got):
        _remove(path)
        raise ExportError(f"the exported file has {len(got)} outputs but the lowered model returns {len(ref)} "
                          "tensors; the file was removed")
    units = _output_units(onnx.load(str(path), load_external_data=False))
    bad = compare_outputs(names, got, ref, units)
    if bad:  # deep nets cascade rounding flips: measure this model's own noise floor before refusing
        bad = compare_outputs(names, got, ref, units, _jittered(gm, args))
    if bad:  # indices of equal values (quantized values tie often) may be picked in either order
        tied = {names[i] for i in _tied_index_outputs(gm, args, got, ref)}
        bad = [b for b in bad if b.output not in tied]
    if bad:
        saturating = optimize and host_u8s8_saturates() and _has_signed_weights(path)
        _remove(path)
        lines = "\n  ".join(str(b) for b in bad)
        if saturating:
            raise ExportError(
                f"ONNX Runtime's fused integer kernels (ORT_ENABLE_ALL) disagree with the lowered model on the example "
                f"inputs:\n  {lines}\nthis x86 CPU has no VNNI, and ONNX Runtime's uint8 x int8 kernels saturate on it "
                "(int16 pair sums): int8 weights are computed wrongly here, not in the file. Export with "
                "target='onnxruntime_avx2' (the same weights stored as uint8: its U8U8 kernels do not saturate), or "
                "deploy on a CPU with VNNI / on ARM; the file was removed"
            )
        level = "with its default graph optimizations" if optimize else "without graph optimizations"
        raise ExportError(
            f"the exported file does not compute what the lowered model computes (ONNX Runtime {level} vs torch, on "
            f"the example inputs):\n  {lines}\nthe file was removed. This is a qtrim_fx bug for this model: please "
            "report it; export_onnx(..., verify=False) writes the file anyway"
        )


#: index ops whose ties either side may break its own way: target -> (position of the dim argument, default dim)
_INDEX_OPS: dict[Any, tuple[int, int | None]] = {
    torch.topk: (2, -1), torch.argmax: (1, None), torch.argmin: (1, None), torch.sort: (1, -1),
    torch.argsort: (1, -1), torch.max: (1, None), torch.min: (1, None),  # max/min(x, dim)[1]
    "topk": (2, -1), "argmax": (1, None), "argmin": (1, None), "sort": (1, -1), "argsort": (1, -1),
    "max": (1, None), "min": (1, None),
    torch.ops.aten.topk.default: (2, -1), torch.ops.aten.argmax.default: (1, None),
    torch.ops.aten.argmin.default: (1, None), torch.ops.aten.sort.default: (1, -1),
    torch.ops.aten.max.dim: (1, None), torch.ops.aten.min.dim: (1, None),
}


def _tied_index_outputs(gm: torch.nn.Module, args: tuple[Any, ...], got: Sequence[np.ndarray],
                        ref: Sequence[np.ndarray]) -> set[int]:
    """Integer outputs of topk / argmax / argmin / sort / max(dim) whose two answers point at equal values.

    ``torch.topk(x, k)`` and ONNX ``TopK`` (likewise arg-max/min and sorting) may order equal values
    differently; quantized values are equal often (one code per step). The indices then differ while
    selecting the same values: such an output is not a disagreement. The values are the lowered model's
    own input to the op (both sides compute them alike, up to rounding flips that the float checks see).
    """
    if not isinstance(gm, fx.GraphModule):
        return set()
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves = torch.utils._pytree.tree_leaves(out_node.args[0])
    wanted: dict[int, tuple[fx.Node, int | None, bool]] = {}
    for i, leaf in enumerate(leaves):
        if i >= len(ref) or np.issubdtype(np.asarray(ref[i]).dtype, np.floating) or not isinstance(leaf, fx.Node):
            continue
        op = leaf
        if leaf.target is operator.getitem and isinstance(leaf.args[0], fx.Node) and leaf.args[1] == 1:
            op = leaf.args[0]  # topk(...)[1], sort(...)[1]
        key = op.target if op.op == "call_function" else op.target if op.op == "call_method" else None
        if key not in _INDEX_OPS or not op.args or not isinstance(op.args[0], fx.Node):
            continue
        pos, default = _INDEX_OPS[key]
        dim = op.args[pos] if len(op.args) > pos else op.kwargs.get("dim", default)
        keepdim = bool(op.kwargs.get("keepdim", False))
        wanted[i] = (op.args[0], dim, keepdim)
    if not wanted:
        return set()
    values: dict[fx.Node, np.ndarray] = {}

    class _Record(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if any(n is v for v, _, _ in wanted.values()) and isinstance(result, torch.Tensor):
                values[n] = result.detach().cpu().numpy()
            return result

    was_training = gm.training
    try:
        with contextlib.suppress(NotImplementedError):  # torch.export's modules refuse train()/eval()
            gm.eval()
        with torch.no_grad():
            _Record(gm).run(*args)
    except Exception:
        return set()
    finally:
        with contextlib.suppress(NotImplementedError):
            gm.train(was_training)
    tied = set()
    for i, (node, dim, keepdim) in wanted.items():
        x = values.get(node)
        g, r = np.asarray(got[i]), np.asarray(ref[i])
        if x is None or g.shape != r.shape or not isinstance(dim, (int, type(None))):
            continue
        try:
            if dim is None:
                picked = x.reshape(-1)[g.reshape(-1)], x.reshape(-1)[r.reshape(-1)]
            else:
                gi, ri = (g, r) if keepdim or g.ndim == x.ndim else (np.expand_dims(g, dim), np.expand_dims(r, dim))
                picked = np.take_along_axis(x, gi, dim), np.take_along_axis(x, ri, dim)
        except (IndexError, ValueError):
            continue
        if np.array_equal(*picked):
            tied.add(i)
    return tied


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(os.path.realpath(path))


def refuse_value_branches(prepared: torch.nn.Module, gm: torch.nn.Module) -> None:
    """Refuse, before exporting, a leaf whose forward branches on tensor values (see
    :attr:`~qtrim_fx.frontend.trace.Fallback.data_dependent`): tracing it keeps one branch only.

    Args:
        prepared: the prepared model (its capture's leaves are in its info).
        gm: the lowered model about to be exported (a leaf still called there is checked).

    Raises:
        ExportError: naming each such leaf, its condition and the fix.
    """
    info = prepared.__dict__.get(INFO_ATTR)
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"} if hasattr(gm, "graph") else set()
    leaves = [f for f in (info.fallbacks if info else ()) if f.data_dependent and f.module in called]
    if leaves:
        what = "; ".join(f"'{f.module}': {f.reason.split(';')[0]}" for f in leaves)
        raise ExportError(
            f"the exported file would hold only the branch the example inputs take in submodule(s) that branch on "
            f"tensor values ({what}). Make the branch traceable (compute both results and "
            "pick with torch.where) so capture traces it, or move the decision out of the model; "
            "export_onnx(..., verify=False) writes the traced branch anyway (correct only for inputs that take it)"
        )
