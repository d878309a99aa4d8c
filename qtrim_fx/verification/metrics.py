"""Metrics of :func:`qtrim_fx.verify`: output comparison (float64 accumulators) and the per-layer report.

Per layer: every Conv/ConvTranspose/Gemm/MatMul output of the exported model is paired with the
same layer of the FP32 reference ONNX (by the names the export keeps, else by graph order), both
files are re-written with those tensors as extra outputs, and each pair is compared like an output.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from qtrim_fx.verification import backend_worker as worker
from qtrim_fx.verification.backend_worker import Batch
from qtrim_fx.verification.report import WORST_LAYERS, LayerMetrics, OutputMetrics, PerLayerReport

__all__ = ["PER_LAYER_OPS", "compare_outputs", "per_layer_report"]

PER_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _input_names(model) -> list[str]:
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


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
        if self.count == 0:  # nothing compared: no figure can claim agreement
            return OutputMetrics(output=name, shape=self.shape or [], mse=math.nan, sqnr_db=math.nan,
                                 max_abs_err=math.nan, cosine=math.nan, top1=None)
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


def compare_outputs(ref: Sequence[Batch], test: Sequence[Batch], names: Sequence[str]) -> list[OutputMetrics]:
    """Metrics of ``test`` against ``ref``, one :class:`OutputMetrics` per output name.

    Args:
        ref: reference outputs, one list of arrays per batch.
        test: outputs to judge, same structure and shapes.
        names: output names, one per array of a batch.

    Returns:
        The metrics, accumulated in float64 over all batches; all NaN for an output with no values.

    Raises:
        ValueError: a batch with another number of outputs or another shape than the reference.
    """
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
        from qtrim_fx.onnx.dynamo_export import export_float

        export_float(module, example, path, names, opset=max(13, min(opset, 20)))  # torch.export + onnxscript
    finally:
        module.train(was_training)
    return path


def per_layer_report(model_path: str, reference, batches: Sequence[Batch], tmp: str) -> PerLayerReport:
    """Compare the model's intermediate tensors with the FP32 reference's (see the module docstring).

    Args:
        model_path: the verified ONNX file.
        reference: the FP32 ONNX path, or a torch module (exported with ``torch.onnx.export``).
        batches: the input batches.
        tmp: a scratch folder for the re-written models.

    Returns:
        The report; failures are its ``status``/``message``, not exceptions.
    """
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
            "torch reference exported with torch.onnx.export(dynamo=True); matched by tensor/node names"
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


