"""PlanLoweringPass: decide, per site, what a target deploys (analysis only; no graph edits).

For every site node of a prepared model it writes a frozen :class:`~qtrim_fx.core.spec.LoweredSite`
under ``node.meta[LOWER_PLAN]``: whether the target keeps a quantizer there and, if so, its grid,
channel axis and qparams, derived from the site's stored raw statistics::

    before:  yq = call_module[qtrim_sites.fc_out](y)             meta: {qtrim_site: SiteSpec(fc.out, role=output)}
    after:   yq = call_module[qtrim_sites.fc_out](y)             meta: {..., qtrim_lower_plan:
                 LoweredSite(fc.out, kept=False, reason="output of a weighted op: target 'tensorrt' ...")}

Qparams come from the stored raw statistics, for the target profile's grid
(symmetric targets use max(|ã|, |b̃|) of the same statistics). Sites with role
``"output"`` are dropped for targets that want no Q on Conv/Gemm/MatMul outputs; sites trained in
float as model outputs (``QuantSite.float_output``: logits) are dropped for every target that is not
integer-only (an integer-only one quantizes them from their unclipped range).
A weight whose target channel axis differs from the trained one gets its |w|
quantile recomputed from the final weight along the target axis.
``LowerSitesPass`` applies these records; :func:`lowering_plan` returns them for ``inspect``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from qtrim_fx.core.attrs import get_attr_tensor
from qtrim_fx.core.errors import ExportError, UncalibratedSitesError
from qtrim_fx.core.fakequant import derive_qparams
from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.core.scheme import QuantScheme
from qtrim_fx.core.spec import LOWER_PLAN, OUTPUT_CHANNEL_AXIS, SITE_NODE, LoweredSite, SiteSpec
from qtrim_fx.passes.base import GraphPass, PassResult
from qtrim_fx.runtime.quantiles import tail_quantiles
from qtrim_fx.runtime.site import QuantSite

__all__ = ["PlanLoweringPass", "target_scheme"]


def target_scheme(spec: SiteSpec, profile: TargetProfile) -> QuantScheme:
    """The integer grid ``profile`` deploys for the site ``spec`` (weights by op kind, activations alike).

    A weight trained per-tensor (a config or override, or the profile's ``matmul_weights_per_tensor``)
    is deployed per-tensor on every target: what is deployed is what was trained.
    """
    if spec.kind == "weight":
        op = spec.op if spec.op in ("conv", "conv_transpose", "linear") else (
            "matmul" if spec.op in ("matmul", "bmm") and spec.channel_axis is not None else spec.op)
        scheme = profile.weight_scheme(op, bits=spec.scheme.bits)
        if spec.scheme.axis is None and scheme.axis is not None:
            return scheme.with_axis(None)
        if scheme.axis is not None and spec.channel_axis is not None and scheme.axis == _OUTPUT_AXIS.get(op):
            # The profile wants the output channel, which the site trained on: its axis is in the parameter's own
            # layout (prepare followed the views between them: q @ rel.T has rel's rows as output channels); the
            # profile's number is in the op's operand layout and is not the same axis through a transpose.
            return scheme.with_axis(spec.channel_axis)
        return scheme
    return profile.activation_scheme(bits=spec.scheme.bits)


#: the output channel of each weighted op kind, in the layout the op reads the weight in (WeightAxes' defaults)
_OUTPUT_AXIS = {**OUTPUT_CHANNEL_AXIS, "matmul": -1}


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
    if getattr(site.observer, "weight_range", "quantile") == "max":  # the site's own weight rule
        m = rows.amax(1)
    else:
        m, _ = tail_quantiles(rows, site.observer.p_hi)
    return -m, m


def _site_input(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    return get_attr_tensor(gm, node.args[0])


def site_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``call_module`` site nodes of a prepared graph, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and SITE_NODE in n.meta]


def plan_site(gm: fx.GraphModule, node: fx.Node, profile: TargetProfile) -> LoweredSite:
    """The lowering decision for one site node (see the module doc)."""
    spec: SiteSpec = node.meta[SITE_NODE]
    site: QuantSite = gm.get_submodule(str(node.target))
    if spec.kind == "activation" and spec.role == "output" and not profile.quantize_op_outputs:
        return LoweredSite(spec.name, kept=False, reason=(
            f"output of a weighted op only: target {profile.name!r} takes no Q on Conv/Gemm/MatMul outputs"))
    if site.float_output and not profile.integer_only:
        return LoweredSite(spec.name, kept=False, reason=(
            "model output: read by no integer kernel, trained in float, left float"))
    scheme = target_scheme(spec, profile)
    w = _site_input(gm, node) if spec.kind == "weight" else None
    reason = ""
    if w is not None:
        lo, hi = _weight_stats(site, scheme, w)
        if scheme.axis != site.observer.axis:
            reason = f"weight statistics re-derived for the target's axis {scheme.axis}"
    else:
        lo, hi = site.observer.stats()
    scale, zp = derive_qparams(scheme, lo, hi, site.eps)
    axis = None if scheme.axis is None else scheme.axis % max(1, w.dim() if w is not None else scheme.axis + 1)
    return LoweredSite(spec.name, kept=True, scheme=scheme, axis=axis, scale=scale.detach().clone(),
                       zero_point=zp.detach().clone(), reason=reason)


class PlanLoweringPass(GraphPass):
    """Record a :class:`LoweredSite` for every site node (see module doc); the graph is not edited."""

    def __init__(self, profile: TargetProfile) -> None:
        self.profile = profile

    def requires(self, gm: fx.GraphModule) -> None:
        missing = [n.meta[SITE_NODE].name for n in site_nodes(gm)
                   if not gm.get_submodule(str(n.target)).observer.initialized]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise UncalibratedSitesError(
                f"{len(missing)} quantization site(s) never saw data: {shown}. Run "
                "qtrim_fx.calibrate(model, batches) or train the prepared model before exporting"
            )
        bad = [problem for n in site_nodes(gm) if (problem := _non_finite(gm, n))]
        if bad:
            shown = "; ".join(bad[:8]) + (f"; and {len(bad) - 8} more" if len(bad) > 8 else "")
            raise ExportError(
                f"refusing to export {len(bad)} site(s) whose values are not usable: {shown}. The model "
                "diverged (NaN/Inf in training) or its state is corrupted: restore a good checkpoint, or "
                "recalibrate with qtrim_fx.calibrate(model, batches)"
            )

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in site_nodes(gm):
            plan = plan_site(gm, node, self.profile)
            old = node.meta.get(LOWER_PLAN)
            if not _same_plan(old, plan):
                node.meta[LOWER_PLAN] = plan
                modified = True
        return PassResult(gm, modified)


def _non_finite(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why a site's weight or statistics cannot give qparams (non-finite, inverted), else ``None``."""
    spec: SiteSpec = node.meta[SITE_NODE]
    obs = gm.get_submodule(str(node.target)).observer
    lo, hi = obs.lo, obs.hi  # raw: stats() reads a never-observed NaN as 0
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
        return f"{spec.name} (non-finite statistics: it saw no finite value, or its state is corrupted)"
    if bool((lo > hi).any()):
        return f"{spec.name} (inverted statistics: low > high)"
    w = get_attr_tensor(gm, node.args[0]) if spec.kind == "weight" else None
    if w is not None and not bool(torch.isfinite(w).all()):
        return f"{spec.name} (non-finite weight values)"
    return None


def _same_plan(a: LoweredSite | None, b: LoweredSite) -> bool:
    if a is None or (a.name, a.kept, a.scheme, a.axis, a.reason) != (b.name, b.kept, b.scheme, b.axis, b.reason):
        return False
    return all(x is y or (x is not None and y is not None and torch.equal(x, y))
               for x, y in ((a.scale, b.scale), (a.zero_point, b.zero_point)))


def lowering_plan(model: fx.GraphModule, target: str | TargetProfile, opset: int | None = None) -> dict[str, LoweredSite]:
    """What lowering ``model`` for ``target`` decides per site, by site name (the model is not changed).

    Runs the lowering pipeline up to and including :class:`PlanLoweringPass` on a copy, so
    folded weights are planned exactly as :func:`qtrim_fx.lower` plans them.
    """
    import copy

    from qtrim_fx.core.profiles import get_profile
    from qtrim_fx.passes.base import run_passes
    from qtrim_fx.passes.lower.fold_bn import FoldBatchNormPass
    from qtrim_fx.passes.lower.restore_relu import RestoreReluPass
    from qtrim_fx.passes.lower.sink_weights import SinkWeightsPass
    from qtrim_fx.runtime.prepared import require_prepared

    require_prepared(model, "lowering_plan")
    profile = get_profile(target)
    if opset is not None:
        profile = profile.replace(opset=int(opset))
    gm = run_passes(copy.deepcopy(model).eval(), [RestoreReluPass(), SinkWeightsPass(), FoldBatchNormPass(),
                                                         PlanLoweringPass(profile)])
    return {n.meta[LOWER_PLAN].name: n.meta[LOWER_PLAN] for n in site_nodes(gm)}
