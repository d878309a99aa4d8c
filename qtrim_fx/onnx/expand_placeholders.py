"""Rewrite every ``qtrim::QDQ`` placeholder into standard QuantizeLinear / DequantizeLinear.

Weight (input is an initializer or Constant), profile ``weight_storage="integer"``::

    conv.weight (f32) -> qtrim::QDQ(s, z) -> Conv
      =>  conv.weight_quantized (int8/int4 codes) -> DequantizeLinear(conv.weight_scale,
          conv.weight_zero_point[, axis]) -> Conv

The codes are computed here exactly like QuantizeLinear (``x / s``, round half to even, + z,
clip to ``[qmin, qmax]``), so a narrow grid (``[-127, 127]``, int4 in ``[-7, 7]``) is exact.
With ``weight_storage="float"`` the initializer holds the dequantized floats, followed by
QuantizeLinear + DequantizeLinear (which reproduce the same codes).

Activation::

    relu_out -> qtrim::QDQ(s, z) -> ...
      =>  relu_out [-> Clip(s*(qmin-z), s*(qmax-z))] -> QuantizeLinear -> DequantizeLinear -> ...

The Clip appears only when ``[qmin, qmax]`` is narrower than the storage type; it makes
QuantizeLinear saturate at ``qmin``/``qmax`` exactly. Scales and zero points are 0-D per-tensor
and 1-D (with ``axis``) per-channel; zero points are explicit, in the storage type. Nodes and
initializers are named after the site: ``<site>/QuantizeLinear``, ``<site>_scale``, ...
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from qtrim_fx.core.dtypes import StorageType
from qtrim_fx.core.errors import ExportError
from qtrim_fx.core.fakequant import channel_view
from qtrim_fx.core.fakequant import quantize_codes as core_quantize_codes
from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.onnx._graph import NameScope, add_initializer, const_array, value_rank
from qtrim_fx.runtime.qdq import QDQAttrs, is_placeholder

__all__ = ["ExpandPlaceholdersPass", "quantize_codes", "require_storage"]


@dataclass(frozen=True)
class _Site:
    """A placeholder's attributes with its constant, validated qparams."""

    attrs: QDQAttrs
    scale: np.ndarray  # float32, 0-D or 1-D
    zero_point: np.ndarray  # float32 holding integers, shaped like scale
    axis: int | None  # normalized when the rank is known

    @property
    def name(self) -> str:
        return self.attrs.name

    def broadcast(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        return (channel_view(torch.from_numpy(self.scale), rank, self.axis).numpy(),
                channel_view(torch.from_numpy(self.zero_point), rank, self.axis).numpy())


def quantize_codes(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """QuantizeLinear of a weight initializer, as int64 codes: :func:`qtrim_fx.core.fakequant.quantize_codes`
    on float32 copies (the bits the trained model's fake quantization produced)."""
    def f32(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy

    return core_quantize_codes(f32(w), f32(scale), f32(zero_point), qmin, qmax).numpy().astype(np.int64)


class ExpandPlaceholdersPass(ir.passes.InPlacePass):
    """Placeholder -> integer weight + DQ, or activation Q + DQ (see module docstring)."""

    def __init__(self, profile: TargetProfile) -> None:
        super().__init__()
        self.profile = profile

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", self.profile.opset)
        placeholders = [n for n in graph if is_placeholder(n)]
        _free_qparam_names(placeholders)
        names = NameScope(graph)
        modified = False
        for node in placeholders:
            site = _read_site(node)
            require_storage(site.attrs.storage, site.name, self.profile, opset)
            weight = const_array(node.inputs[0])
            if weight is not None and self.profile.weight_storage == "integer":
                nodes = _integer_weight(graph, site, weight, names)
            elif weight is not None:
                nodes = _float_weight(graph, site, weight, names)
            else:
                nodes = _activation(graph, site, node.inputs[0], names)  # type: ignore[arg-type]
            graph.insert_before(node, nodes)
            _replace_output(node.outputs[0], nodes[-1].outputs[0])
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)


def _free_qparam_names(placeholders: list[ir.Node]) -> None:
    """Rename the float qparam buffers only placeholders read, so ``<site>_scale`` & co. are free."""
    for node in placeholders:
        for value in node.inputs[1:3]:
            only_ours = value is not None and value.is_initializer() and not value.is_graph_input() and all(
                is_placeholder(u) for u, _ in value.uses())
            if only_ours and not value.name.endswith(_OLD):  # type: ignore[union-attr]
                value.name = f"{value.name}{_OLD}"  # type: ignore[union-attr]


_OLD = ".qdq_placeholder_param"


def _read_site(node: ir.Node) -> _Site:
    attrs = QDQAttrs.from_node(node)
    x = node.inputs[0]
    if x is not None and x.dtype is not None and x.dtype != ir.DataType.FLOAT:
        if x.dtype.is_floating_point():
            raise ExportError(f"site {attrs.name!r} quantizes a {x.dtype.name} tensor; export the model in float32 "
                              "(model.float() before export_onnx)")
        raise ExportError(f"site {attrs.name!r} quantizes a {x.dtype.name} tensor: only floating-point tensors have a "
                          "grid. Exclude the op that produces it with QuantConfig(overrides=(Override(name=...,"
                          " exclude=True),)) and report the model: qtrim_fx should not place a site there")
    scale, zp = (const_array(v) for v in node.inputs[1:3])
    if scale is None or zp is None:
        raise ExportError(f"site {attrs.name!r}: scale/zero_point are not constants in the exported graph; "
                          "store them as buffers (get_attr) so they export as initializers")
    scale, zp = scale.astype(np.float32), zp.astype(np.float32)
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise ExportError(f"site {attrs.name!r}: scales must be finite and > 0, got min {scale.min()!r}; "
                          "calibrate or train the model before exporting")
    st = attrs.storage
    if not (np.all(zp == np.rint(zp)) and np.all((zp >= st.lo) & (zp <= st.hi))):
        raise ExportError(f"site {attrs.name!r}: zero points must be integers in [{st.lo}, {st.hi}] ({st.name})")
    axis = attrs.axis
    if scale.shape != zp.shape or (axis is None and scale.size != 1) or (axis is not None and scale.ndim != 1):
        raise ExportError(f"site {attrs.name!r}: scale {scale.shape} / zero point {zp.shape} do not fit "
                          f"{'per-tensor (one value)' if axis is None else f'per-channel axis {axis} (1-D)'}")
    if axis is None:
        return _Site(attrs, scale.reshape(()), zp.reshape(()), None)
    rank = value_rank(x)
    if axis < 0 and rank is not None:
        axis += rank
    return _Site(attrs, scale.reshape(-1), zp.reshape(-1), axis)


def require_storage(st: StorageType, site: str, profile: TargetProfile, opset: int | None = None) -> None:
    """Raise unless ``profile`` at ``opset`` (default: the profile's) can store a site of type ``st``."""
    opset = profile.opset if opset is None else opset
    if st.bits == 8:
        return
    kind = "INT4 weights" if st.bits == 4 else "INT16 tensors"
    if st.bits == 4 and not profile.allow_int4:
        raise ExportError(f"{kind} need opset >= 21 (site {site!r}), but target {profile.name!r} does not "
                          f"accept INT4 (allow_int4=False, max opset {profile.max_opset}); lower this site "
                          "with 8 bits or pick a profile that allows INT4")
    if st.min_opset > opset:
        raise ExportError(f"{kind} need opset >= {st.min_opset} (site {site!r}); pass opset={st.min_opset} "
                          f"or a profile that allows it (target {profile.name!r}, this export: opset {opset}),"
                          f" e.g. get_profile({profile.name!r}).replace(opset={st.min_opset})")


def _qparam_initializers(graph: ir.Graph, site: _Site, names: NameScope) -> tuple[ir.Value, ir.Value]:
    st = site.attrs.storage
    scale = add_initializer(graph, names.value(f"{site.name}_scale"), site.scale)
    zp = site.zero_point.astype(np.int64).astype(st.numpy_dtype)
    return scale, add_initializer(graph, names.value(f"{site.name}_zero_point"), zp, st.ir_dtype)


def _dq(site: _Site, q: ir.Value, scale: ir.Value, zp: ir.Value, names: NameScope) -> ir.Node:
    attrs = {} if site.axis is None else {"axis": site.axis}
    out = ir.val(names.value(f"{site.name}_dequantized"), ir.DataType.FLOAT, q.shape)
    return ir.node("DequantizeLinear", [q, scale, zp], attrs, outputs=[out],
                   name=names.node(f"{site.name}/DequantizeLinear"))


def _q(site: _Site, x: ir.Value, scale: ir.Value, zp: ir.Value, names: NameScope) -> ir.Node:
    attrs = {} if site.axis is None else {"axis": site.axis}
    out = ir.val(names.value(f"{site.name}_quantized"), site.attrs.storage.ir_dtype, x.shape)
    return ir.node("QuantizeLinear", [x, scale, zp], attrs, outputs=[out],
                   name=names.node(f"{site.name}/QuantizeLinear"))


def _weight_codes(site: _Site, weight: np.ndarray) -> np.ndarray:
    if site.axis is not None and not 0 <= site.axis < weight.ndim:
        raise ExportError(f"site {site.name!r}: axis {site.attrs.axis} is out of range for a "
                          f"{weight.ndim}-D weight")
    if site.axis is not None and site.scale.size != weight.shape[site.axis]:
        raise ExportError(f"site {site.name!r}: {site.scale.size} scales for axis {site.axis} of a weight "
                          f"shaped {weight.shape}")
    s, z = site.broadcast(weight.ndim)
    return quantize_codes(weight, s, z, site.attrs.qmin, site.attrs.qmax)


def _integer_weight(graph: ir.Graph, site: _Site, weight: np.ndarray, names: NameScope) -> list[ir.Node]:
    st = site.attrs.storage
    codes = _weight_codes(site, weight).astype(st.numpy_dtype)
    q = add_initializer(graph, names.value(f"{site.name}_quantized"), codes, st.ir_dtype)
    scale, zp = _qparam_initializers(graph, site, names)
    return [_dq(site, q, scale, zp, names)]


def _float_weight(graph: ir.Graph, site: _Site, weight: np.ndarray, names: NameScope) -> list[ir.Node]:
    s, z = site.broadcast(weight.ndim)
    # Stored on the grid: QuantizeLinear maps these floats back to exactly the same codes.
    grid = ((_weight_codes(site, weight) - z) * s).astype(np.float32)
    w = add_initializer(graph, names.value(f"{site.name}_float"), grid)
    scale, zp = _qparam_initializers(graph, site, names)
    q = _q(site, w, scale, zp, names)
    return [q, _dq(site, q.outputs[0], scale, zp, names)]


def _activation(graph: ir.Graph, site: _Site, x: ir.Value, names: NameScope) -> list[ir.Node]:
    scale, zp = _qparam_initializers(graph, site, names)
    nodes = []
    if site.attrs.narrow:
        nodes.append(_narrow_clip(graph, site, x, names))
        x = nodes[-1].outputs[0]
    q = _q(site, x, scale, zp, names)
    return [*nodes, q, _dq(site, q.outputs[0], scale, zp, names)]


def _narrow_clip(graph: ir.Graph, site: _Site, x: ir.Value, names: NameScope) -> ir.Node:
    """Clip to the float image of ``[qmin, qmax]``: QuantizeLinear then saturates there exactly."""
    if site.axis is not None:
        raise ExportError(f"site {site.name!r}: a per-channel activation with a range [{site.attrs.qmin}, "
                          f"{site.attrs.qmax}] narrower than {site.attrs.storage.name} is not supported; "
                          "use the full storage range or a per-tensor scale")
    lo = np.float32(site.scale * np.float32(site.attrs.qmin - site.zero_point))
    hi = np.float32(site.scale * np.float32(site.attrs.qmax - site.zero_point))
    lo_v = add_initializer(graph, names.value(f"{site.name}_clip_min"), np.array(lo, np.float32))
    hi_v = add_initializer(graph, names.value(f"{site.name}_clip_max"), np.array(hi, np.float32))
    out = ir.val(names.value(f"{site.name}_clipped"), ir.DataType.FLOAT, x.shape)
    return ir.node("Clip", [x, lo_v, hi_v], outputs=[out], name=names.node(f"{site.name}/Clip"))


def _replace_output(old: ir.Value, new: ir.Value) -> None:
    """Rewire all uses; a graph output keeps its public name."""
    if new.shape is None and old.shape is not None:
        new.shape = old.shape
    if old.is_graph_output():
        public = old.name
        old.name = f"{public}__replaced"
        new.name = public
    old.replace_all_uses_with(new, replace_graph_outputs=True)
