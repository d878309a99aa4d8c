"""Plots of what Quant-Trim does (matplotlib, Agg backend, PNG files).

    plot_curriculum(Curriculum(10, 50, 20), epochs=80, path="curriculum.png", pins=pruner)
    plot_weight_distributions(before, after, "weights.png", thresholds=taus)   # the paper's Figures 2 and 9
    plot_layer_sqnr(verify(..., per_layer=True), "layer_sqnr.png")

matplotlib is an optional dependency (``pip install matplotlib``); it is imported when a plot is drawn.
Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qtrim_fx.train.curriculum import Curriculum
from qtrim_fx.train.pruner import ReversePruner

__all__ = ["plot_curriculum", "plot_layer_sqnr", "plot_weight_distributions"]

_BEFORE, _AFTER, _TAU = "#424242", "#7b1fa2", "#d32f2f"


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("qtrim_fx plots need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG atomically (a failed write leaves the previous file as it was) and close it."""
    from qtrim_fx.core.fileio import write_atomically

    path = Path(path)
    try:
        write_atomically(path, lambda f: fig.savefig(f, dpi=110, format="png", bbox_inches="tight"))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


# --- weights -------------------------------------------------------------------------------------------


def _pick(names: Sequence[str], k: int) -> list[str]:
    """At most ``k`` names, evenly spread, always keeping the first and the last."""
    if len(names) <= k:
        return list(names)
    if k == 1:
        return [names[0]]
    idx = sorted({round(i * (len(names) - 1) / (k - 1)) for i in range(k)})
    return [names[i] for i in idx]


def _tau(name: str, thresholds: Mapping[str, Any] | None) -> float | None:
    t = None if thresholds is None else thresholds.get(name)
    return None if t is None else float(torch.as_tensor(t).float().max())


def plot_weight_distributions(
    weights_before: Mapping[str, torch.Tensor],
    weights_after: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    max_layers: int = 6,
    thresholds: Mapping[str, Any] | None = None,
    bins: int = 80,
    title: str = "Weight distributions before / after reverse pruning",
) -> Path:
    """Per-layer histograms of weights before and after reverse pruning (log-scale counts, ±τ marked).

    Args:
        weights_before: layer name -> weight tensor before pinning.
        weights_after: layer name -> the same weight after pinning (names missing here are skipped).
        path: output PNG.
        max_layers: at most this many panels; layers are picked evenly, first and last kept.
        thresholds: layer name -> τ (a scalar or per-channel tensor; the largest is marked). Without it
            ``max |w_after|`` is marked, which is τ for a per-tensor pin.
        bins: histogram bins (shared by before and after in each panel).
        title: figure title.

    Returns:
        The PNG path.

    Raises:
        ValueError: no layer is present in both mappings, or ``max_layers < 1``.
    """
    if max_layers < 1:
        raise ValueError(f"max_layers={max_layers} must be >= 1")
    names = _pick([n for n in weights_before if n in weights_after], max_layers)
    if not names:
        raise ValueError("weights_before and weights_after share no layer name: nothing to plot")
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    height = 3.3 * rows + 0.5
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, height), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        before = weights_before[name].detach().float().flatten().cpu()
        after = weights_after[name].detach().float().flatten().cpu()
        lim = float(max(before.abs().max(), after.abs().max(), 1e-12))
        edges = torch.linspace(-lim, lim, bins + 1).numpy()
        ax.hist(before.numpy(), bins=edges, histtype="step", color=_BEFORE, linewidth=1.4, label="before (FP32)")
        ax.hist(after.numpy(), bins=edges, histtype="stepfilled", color=_AFTER, alpha=0.45,
                label="after reverse pruning")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.7)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        tau = _tau(name, thresholds)
        if tau is None:
            tau = float(after.abs().max())
        for sign in (-1, 1):
            ax.axvline(sign * tau, color=_TAU, linestyle="--", linewidth=1.1, label="±τ" if sign > 0 else None)
        clipped = float((before.abs() > tau * (1 + 1e-6)).float().mean()) if before.numel() else 0.0
        ax.set_title(_short(name, 38), fontsize=10)
        ax.text(0.02, 0.97, f"τ = {tau:.3g}\nclipped {100 * clipped:.1f}%\nn = {before.numel():,}",
                transform=ax.transAxes, va="top", fontsize=8,
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "edgecolor": "#bdbdbd"})
        ax.set_xlabel("weight value", fontsize=9)
        ax.set_ylabel("count (log)", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=9, ncol=3, frameon=False)
    fig.suptitle(title, x=0.01, ha="left", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))
    return _save(fig, path)


def _short(s: str, n: int) -> str:
    """A name from the model as a plot label: control characters as ``\\xNN``, ``$`` not read as
    mathtext, cut to ``n`` characters from the left."""
    from qtrim_fx.tools.sanitize import printable

    s = printable(s)
    s = s if len(s) <= n else "…" + s[-(n - 1):]
    return s.replace("$", "\\$")


# --- curriculum ----------------------------------------------------------------------------------------


def _pin_epochs(pins: ReversePruner | Iterable[float] | None, curriculum: Curriculum, epochs: int) -> list[float]:
    if pins is None:
        return []
    if isinstance(pins, ReversePruner):
        return [e for e in range(epochs + 1) if pins.is_pin_epoch(e, start=curriculum.warmup)]
    return sorted(float(e) for e in pins)


def plot_curriculum(
    curriculum: Curriculum,
    epochs: int,
    path: str | os.PathLike[str],
    pins: ReversePruner | Iterable[float] | None = None,
    steps_per_epoch: int = 20,
) -> Path:
    """λ_t over training, with the warmup / quartic ramp / quadratic phases and the pin epochs marked.

    Args:
        curriculum: the :class:`~qtrim_fx.Curriculum`.
        epochs: training length (x axis from 0 to ``epochs``).
        path: output PNG.
        pins: pin epochs, or a :class:`~qtrim_fx.ReversePruner` (its schedule from the curriculum's warmup,
            as :class:`~qtrim_fx.QuantTrim` drives it), or None.
        steps_per_epoch: resolution of the per-step curve.

    Returns:
        The PNG path.

    Raises:
        ValueError: ``epochs < 1``.
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    plt = _pyplot()
    n = epochs * steps_per_epoch
    ts = [epochs * i / n for i in range(n + 1)]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.plot(ts, [curriculum(t) for t in ts], color="#1565c0", linewidth=2, label="λ_t per step")
    whole = list(range(epochs + 1))
    ax.plot(whole, [curriculum(e) for e in whole], "o", color="#1565c0", markersize=3, label="λ at epoch start")
    phases = [(0, curriculum.warmup, "#e0e0e0", "FP32 warmup (λ = 0)"),
              (curriculum.warmup, curriculum.ramp_end, "#e3f2fd", "quartic ramp to 0.5"),
              (curriculum.ramp_end, curriculum.end, "#fff3e0", "quadratic ramp to 1")]
    for lo, hi, color, label in phases:
        lo, hi = min(lo, epochs), min(hi, epochs)
        if hi > lo:
            ax.axvspan(lo, hi, color=color, zorder=0, label=label)
    if curriculum.max_blend < 1:
        ax.axhline(curriculum.max_blend, color="#616161", linestyle=":", linewidth=1,
                   label=f"cap α_max = {curriculum.max_blend:g}")
    pin_list = [e for e in _pin_epochs(pins, curriculum, epochs) if 0 <= e <= epochs]
    for i, e in enumerate(pin_list):
        ax.axvline(e, color=_TAU, linestyle="--", linewidth=1, alpha=0.8,
                   label=f"reverse-pruning pin ({len(pin_list)})" if i == 0 else None)
    ax.set_xlim(0, epochs)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("epoch t")
    ax.set_ylabel("blend λ_t  (0 = FP32, 1 = fake quant)")
    ax.set_title(f"Quant-Trim curriculum: E_w = {curriculum.warmup:g}, E_f = {curriculum.ramp_end:g}, "
                 f"H = {curriculum.horizon:g}", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


# --- per-layer SQNR ------------------------------------------------------------------------------------


def _num(v: Any) -> float:
    if isinstance(v, str):
        return float(v)  # "inf", "-inf", "nan" from VerifyReport.to_json
    return math.nan if v is None else float(v)


def _layers_of(report: Any) -> list[dict]:
    data = report
    if hasattr(data, "to_dict"):
        data = data.to_dict()
    elif not isinstance(data, Mapping) and hasattr(data, "__dataclass_fields__"):
        from dataclasses import asdict

        data = asdict(data)
    if not isinstance(data, Mapping):
        raise TypeError(f"expected a VerifyReport, PerLayerReport or their dict, not {type(report).__name__}")
    if "layers" not in data:
        data = data.get("per_layer") or {}
        if not data:
            raise ValueError("the report has no per-layer figures: run verify(..., per_layer=True)")
    if data.get("status", "ok") != "ok" or not data.get("layers"):
        raise ValueError(f"the per-layer report has no figures ({data.get('status')}: {data.get('message', '')})")
    return list(data["layers"])


def plot_layer_sqnr(report_or_dict: Any, path: str | os.PathLike[str], max_layers: int = 80) -> Path:
    """Horizontal bars of per-layer SQNR (dB) from a verify report, lowest ones highlighted.

    Args:
        report_or_dict: a :class:`~qtrim_fx.verify.VerifyReport` from ``verify(..., per_layer=True)``,
            its ``PerLayerReport``, or the dict of either (``to_dict()`` or the JSON file loaded).
        path: output PNG.
        max_layers: draw at most this many layers (the lowest-SQNR ones when there are more).

    Returns:
        The PNG path.

    Raises:
        ValueError: the report has no per-layer figures.
    """
    layers = _layers_of(report_or_dict)
    if len(layers) > max_layers:
        keep = sorted(range(len(layers)), key=lambda i: _num(layers[i]["sqnr_db"]))[:max_layers]
        layers = [layers[i] for i in sorted(keep)]
    plt = _pyplot()
    sqnr = [_num(la["sqnr_db"]) for la in layers]
    finite = [s for s in sqnr if math.isfinite(s)]
    top = max(finite, default=40.0)
    cap = top * 1.08 + 1
    vals = [cap if s == math.inf else (0.0 if not math.isfinite(s) else s) for s in sqnr]
    # Highlight the lowest few only where there are enough bars for "lowest" to single something out.
    n_worst = min(5, len(layers) // 3)
    ranked = sorted(range(len(vals)), key=lambda i: sqnr[i] if not math.isnan(sqnr[i]) else -math.inf)
    worst = set(ranked[:n_worst])
    kinds = {"act": ("#1565c0", "quantized activation (DequantizeLinear)"),
             "op": ("#7b1fa2", "layer output (Conv / Gemm / MatMul)"),
             "worst": ("#d32f2f", "lowest SQNR" if n_worst == 1 else f"{n_worst} lowest SQNR")}
    kind_of = ["worst" if i in worst else ("act" if la["op_type"] == "DequantizeLinear" else "op")
               for i, la in enumerate(layers)]
    colors = [kinds[k][0] for k in kind_of]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.26 * len(layers)))
    y = list(range(len(layers)))
    ax.barh(y, vals, color=colors, height=0.7)
    ax.set_yticks(y, [_short(f"{la['layer']} ({la['op_type']})", 60) for la in layers], fontsize=8)
    ax.invert_yaxis()
    for yi, s, v in zip(y, sqnr, vals, strict=True):
        text = "inf" if s == math.inf else ("nan" if math.isnan(s) else f"{s:.1f}")
        ax.text(v + cap * 0.01, yi, text, va="center", fontsize=7,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6})
    if finite:
        mean = sum(finite) / len(finite)
        ax.axvline(mean, color="#616161", linestyle=":", linewidth=1)
    ax.set_xlim(0, cap * 1.1)
    ax.set_xlabel("SQNR vs FP32 reference (dB, higher is better)")
    from matplotlib.patches import Patch

    handles = [Patch(color=kinds[k][0], label=kinds[k][1]) for k in kinds if k in kind_of]
    if finite:
        handles.append(plt.Line2D([], [], color="#616161", linestyle=":", label=f"mean {mean:.1f} dB"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title("Per-layer SQNR of the quantized model", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
