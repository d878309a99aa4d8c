"""LowerSitesPass: observer + blend-quant sites -> frozen ``quant_dequant`` calls for one target.

    before:  yq = call_module[qtrim_sites.layer1_0_relu_out](y)          (observes, blends by λ)
    after:   s  = get_attr[qtrim_qparams.layer1_0_relu_out_scale]
             z  = get_attr[qtrim_qparams.layer1_0_relu_out_zero_point]
             yq = quant_dequant(y, s, z, 0, 255, None, 8, False, "layer1.0.relu.out")

Qparams come from the stored raw statistics, for the target profile's grid
(symmetric targets use max(|ã|, |b̃|) of the same statistics). Sites with role
``"output"`` are removed for targets that want no Q on Conv/Gemm/MatMul outputs.
A weight whose target channel axis differs from the trained one gets its |w|
quantile recomputed from the final weight along the target axis.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..observer import tail_quantiles
from ..onnx.errors import ExportError
from ..onnx.profiles import TargetProfile
from ..onnx.qdq import quant_dequant
from ..quantize import derive_qparams
from ..scheme import QuantScheme
from ..site import QuantSite
from .base import PassResult, finish
from .spec import SITE_NODE, SiteSpec

__all__ = ["LowerSitesPass", "UncalibratedSitesError"]

QPARAMS_ATTR = "qtrim_qparams"


class UncalibratedSitesError(ExportError):
    """Sites that never saw data cannot be exported."""


def target_scheme(spec: SiteSpec, profile: TargetProfile) -> QuantScheme:
    if spec.kind == "weight":
        op = spec.op if spec.op in ("conv", "conv_transpose", "linear") else (
            "matmul" if spec.op in ("matmul", "bmm") and spec.channel_axis is not None else spec.op)
        return profile.weight_scheme(op, bits=spec.scheme.bits)
    return profile.activation_scheme(bits=spec.scheme.bits)


def _weight_stats(site: QuantSite, scheme: QuantScheme, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = site.observer.stats()
    trained = site.observer.axis
    want = scheme.axis
    if want is not None:
        want = want % w.dim()
    if trained is not None:
        trained = trained % w.dim()
    if want == trained:
        return lo, hi
    if want is None:  # per-tensor from per-channel statistics: the widest channel
        return lo.min(), hi.max()
    rows = w.detach().float().abs().movedim(want, 0).reshape(w.shape[want], -1)
    m, _ = tail_quantiles(rows, site.observer.p_hi)
    return -m, m


def _site_input(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    src = node.args[0]
    if isinstance(src, fx.Node) and src.op == "get_attr":
        obj = gm
        for part in str(src.target).split("."):
            obj = getattr(obj, part)
        return obj
    return None


class LowerSitesPass:
    """Replace every site by a frozen quantize-dequantize for ``profile`` (see module doc)."""

    def __init__(self, profile: TargetProfile) -> None:
        self.profile = profile

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        sites = [n for n in gm.graph.nodes if n.op == "call_module" and SITE_NODE in n.meta]
        missing = [n.meta[SITE_NODE].name for n in sites if not gm.get_submodule(str(n.target)).observer.initialized]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise UncalibratedSitesError(
                f"{len(missing)} quantization site(s) never saw data: {shown}. Run "
                "qtrim_fx.calibrate(model, batches) or train the prepared model before exporting"
            )
        if not hasattr(gm, QPARAMS_ATTR):
            gm.add_module(QPARAMS_ATTR, nn.Module())
        holder = getattr(gm, QPARAMS_ATTR)
        for node in sites:
            spec: SiteSpec = node.meta[SITE_NODE]
            site: QuantSite = gm.get_submodule(str(node.target))
            x = node.args[0]
            if spec.kind == "activation" and spec.role == "output" and not self.profile.quantize_op_outputs:
                node.replace_all_uses_with(x)
                gm.graph.erase_node(node)
                continue
            scheme = target_scheme(spec, self.profile)
            if spec.kind == "weight":
                w = _site_input(gm, node)
                lo, hi = _weight_stats(site, scheme, w) if w is not None else site.observer.stats()
            else:
                lo, hi = site.observer.stats()
            scale, zp = derive_qparams(scheme, lo, hi, site.eps)
            holder.register_buffer(f"{spec.key}_scale", scale.detach().clone())
            holder.register_buffer(f"{spec.key}_zero_point", zp.detach().clone())
            with gm.graph.inserting_before(node):
                s = gm.graph.get_attr(f"{QPARAMS_ATTR}.{spec.key}_scale")
                z = gm.graph.get_attr(f"{QPARAMS_ATTR}.{spec.key}_zero_point")
                axis = None if scheme.axis is None else scheme.axis % max(1, _ndim(w if spec.kind == "weight" else None,
                                                                                     scheme.axis))
                q = gm.graph.call_function(
                    quant_dequant,
                    (x, s, z, scheme.qmin, scheme.qmax, axis, scheme.bits, scheme.signed, spec.name),
                )
            q.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
            q.meta[SITE_NODE] = spec
            node.replace_all_uses_with(q)
            gm.graph.erase_node(node)
        if sites:
            gm.delete_all_unused_submodules()
        return finish(gm, bool(sites))


def _ndim(w: torch.Tensor | None, axis: int) -> int:
    return w.dim() if w is not None else axis + 1
