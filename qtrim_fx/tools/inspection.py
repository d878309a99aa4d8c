"""``qtrim_fx.inspect``: what was quantized where, with which grid, and how much is clipped."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from qtrim_fx.core.profiles import TargetProfile, get_profile
from qtrim_fx.passes.prepare.coverage import float_weights
from qtrim_fx.runtime.bias_shift import bias_shifts
from qtrim_fx.runtime.ops import bn_fold_factor, channel_shape
from qtrim_fx.runtime.prepared import INFO_ATTR, iter_sites, require_prepared
from qtrim_fx.tools.sanitize import printable

__all__ = ["InspectReport", "SiteRow", "inspect"]


@dataclass(frozen=True)
class SiteRow:
    name: str
    kind: str
    role: str
    op: str
    scheme: str
    shape: tuple[int, ...] | None
    scale: tuple[float, float] | None  # (min, max) over channels
    zero_point: tuple[int, int] | None
    clipped: float | None  # fraction of weight values outside the grid's range
    notes: tuple[str, ...]


@dataclass(frozen=True)
class InspectReport:
    frontend: str
    blend: float
    rows: tuple[SiteRow, ...]
    fallbacks: tuple[tuple[str, str], ...]
    float_weights: tuple[tuple[str, str, str], ...] = ()  # (parameter, op, why) left in float

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The sites as a fixed-width table (names from the model with control characters escaped)."""
        head = ("site", "kind", "role", "scheme", "shape", "scale", "zp", "clipped", "notes")
        body = [
            (
                printable(r.name),
                r.kind,
                r.role,
                r.scheme,
                "x".join(map(str, r.shape)) if r.shape else "-",
                _range(r.scale, "{:.3g}"),
                _range(r.zero_point, "{}"),
                "-" if r.clipped is None else f"{100 * r.clipped:.2f}%",
                printable("; ".join(r.notes)),
            )
            for r in self.rows
        ]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        lines = [
            f"front end: {self.frontend}   λ = {self.blend:.4f}   sites: {len(self.rows)} "
            f"({sum(r.kind == 'weight' for r in self.rows)} weight)",
            "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)).rstrip() for b in body]
        for mod, why in self.fallbacks:
            lines.append(printable(f"leaf (not traced, not quantized inside): {mod}: {why}"))
        if self.float_weights:
            lines.append(f"float (not quantized): {len(self.float_weights)} weight(s) of parameter-holding ops")
        for param, op, why in self.float_weights:
            lines.append(printable(f"  {param} ({op}): {why}"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _range(v: tuple | None, fmt: str) -> str:
    if v is None:
        return "-"
    lo, hi = v
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}..{fmt.format(hi)}"


def _deployed_weight(model: nn.Module, spec) -> torch.Tensor:
    w = model.get_parameter(spec.param).detach()
    if spec.folded_bn is not None:
        bn = model.get_submodule(spec.folded_bn)
        f = bn_fold_factor(None if bn.weight is None else bn.weight.detach(), bn.running_var, bn.eps)
        w = w * channel_shape(f, w.dim(), 0)
    return w


def _target_notes(model: nn.Module, target: str | TargetProfile) -> dict[str, str]:
    """Site name -> what lowering for ``target`` decides there, for sites where it says something."""
    from qtrim_fx.passes.lower.plan import lowering_plan

    plan = lowering_plan(model, target)
    name = get_profile(target).name  # aliases and profiles alike are named as the registry names them
    notes = {}
    for site, lowered in plan.items():
        if not lowered.kept:
            notes[site] = f"dropped for {name}: {lowered.reason}"
        elif lowered.reason:
            notes[site] = f"kept for {name}: {lowered.reason}"
    return notes


def _site_row(model: nn.Module, spec, site, extra: str | None) -> SiteRow:
    """The table row of one site (``extra``: a note about the target, or None)."""
    notes = list(spec.notes)
    scale = zp = clipped = None
    shape = None
    if site.observer.initialized:
        s, z = site.qparams()
        scale = (float(s.min()), float(s.max()))
        zp = (int(z.min()), int(z.max()))
    else:
        notes.append("no statistics yet")
    if spec.kind == "weight" and spec.param is not None:
        w = _deployed_weight(model, spec)
        shape = tuple(w.shape)
        if scale is not None:
            s, z = site.qparams()
            sb = s if s.dim() == 0 else channel_shape(s, w.dim(), spec.scheme.axis or 0)
            zb = z if z.dim() == 0 else channel_shape(z, w.dim(), spec.scheme.axis or 0)
            q = torch.round(w / sb) + zb
            clipped = float(((q < spec.scheme.qmin) | (q > spec.scheme.qmax)).float().mean())
    if getattr(site, "float_output", False):
        notes.append("model output: float in training and in float targets' files (quantized for qnn/npu)")
    if spec.kind == "weight":
        shifts = bias_shifts(model)
        mine = (k for k in shifts if k == spec.key or (k.startswith(spec.key + "_") and k[len(spec.key) + 1:].isdigit()))
        deltas = [shifts[k].delta for k in mine if shifts[k].active]
        if deltas:  # calibrate's bias correction of the layer(s) this weight feeds
            notes.append(f"bias corrected: max |δ| {max(float(d.abs().max()) for d in deltas):.3g}")
    if extra is not None:
        notes.append(extra)
    return SiteRow(spec.name, spec.kind, spec.role, spec.op, spec.scheme.describe(), shape, scale, zp, clipped,
                   tuple(notes))


def inspect(model: nn.Module, target: str | TargetProfile | None = None) -> InspectReport:
    """One row per site of a prepared model (prints as a table).

    Args:
        model: a model returned by :func:`qtrim_fx.prepare`.
        target: a target profile or its name (``"tensorrt"`` ...). When given, each site's notes also
            say what lowering for it decides: ``"dropped for T: why"`` for a site the target deploys
            without a quantizer, ``"kept for T: why"`` for a kept one whose plan gives a reason (such
            as weight statistics re-derived for the target's channel axis). The model is not changed.

    Returns:
        :class:`InspectReport` (``print(report)`` shows the table; ``to_dict()`` for JSON). Its
        ``float_weights`` lists every weight of a parameter-holding op left in float, with the reason
        (leaf module, unsupported op, wrapped function, excluded by config).

    Raises:
        UncalibratedSitesError: ``target`` is given and some site has no statistics yet (planning a
            target derives its qparams from them).
        ProfileError: ``target`` names no known profile.
    """
    require_prepared(model, "inspect")
    extra = _target_notes(model, target) if target is not None else {}
    rows = [_site_row(model, spec, site, extra.get(spec.name)) for spec, site, _node in iter_sites(model)]
    info = model.__dict__.get(INFO_ATTR)
    fallbacks = tuple((f.module, f.reason) for f in info.fallbacks) if info else ()
    floats = float_weights(model, info.config if info else None, dict(fallbacks))
    return InspectReport(
        frontend=info.frontend if info else "?",
        blend=float(model.qtrim_blend.value),
        rows=tuple(rows),
        fallbacks=fallbacks,
        float_weights=tuple((f.param, f.op, f.reason) for f in floats),
    )
