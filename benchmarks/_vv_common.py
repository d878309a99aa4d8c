"""Shared pieces of the MNIST and MobileNetV2 vendor-variance tasks (benchmarks/vendor_variance.py).

One checkpoint's recipe files (``qtrim_fx.vendor_sweep``'s, made once each by benchmarks/_vv_sweep.py) run
twice: every recipe on ONNX Runtime and OpenVINO over the whole evaluation set, and a subset of recipes on
the QNN HTP simulator (strict, no CPU fallback) over a subset of it (the simulator runs MobileNetV2 at ~0.6 s per 96×96 image on this box). Rows are
grouped by weight granularity (per-tensor / per-channel recipes); the spread is best − worst over the
group's recipes × runtimes, the worst gap is the FP32 checkpoint's float score − the worst row. HTP rows
score a subset (the first N evaluation inputs): unbiased per row, but noisier than the ORT / OpenVINO rows,
so the tables give the spread without and with them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import qtrim_fx
from qtrim_fx.verification.vendors import VendorVariant

PLOTS = Path(__file__).resolve().parent / "plots"
NAMES = {"fp32": "FP32 checkpoint", "qat": "plain QAT checkpoint", "qt": "Quant-Trim checkpoint"}


def _v(name: str, method: str, per_channel: bool, act: str, calib: int, pct: float = 99.99) -> VendorVariant:
    return VendorVariant(name, method=method, percentile=pct, per_channel=per_channel, activations=act,
                         calib_size=calib)


def recipes(calib_large: int, calib_small: int) -> tuple[VendorVariant, ...]:
    """Our embedded-scale export + 14 ORT ``quantize_static`` recipes: MinMax / Percentile 99.99 / Entropy
    × per-tensor / per-channel weights × U8 / S8 activations at ``calib_large`` samples, and MinMax
    per-tensor / per-channel U8 at ``calib_small``."""
    out = [VendorVariant("qtrim-embedded", tool="qtrim")]
    for method, tag in (("minmax", "minmax"), ("percentile", "pct99.99"), ("entropy", "entropy")):
        for pc in (False, True):
            for act in ("u8", "s8"):
                out.append(_v(f"ort-{tag}-{'pc' if pc else 'pt'}-{act}", method, pc, act, calib_large))
    out += [_v(f"ort-minmax-pt-u8-{calib_small}", "minmax", False, "u8", calib_small),
            _v(f"ort-minmax-pc-u8-{calib_small}", "minmax", True, "u8", calib_small)]
    return tuple(out)


def quick_recipes(calib: int, ours: bool = True) -> tuple[VendorVariant, ...]:
    """--quick: 2 recipes, one per weight granularity: our export (per-channel) or, with ``ours=False`` (its 3
    target exports of MobileNetV2 take ~30 s), ORT MinMax per-channel S8; and ORT MinMax per-tensor U8."""
    pc = (VendorVariant("qtrim-embedded", tool="qtrim") if ours
          else _v(f"ort-minmax-pc-s8-{calib}", "minmax", True, "s8", calib))
    return pc, _v("ort-minmax-pt-u8", "minmax", False, "u8", calib)


def as_prepared(model: torch.nn.Module, calib: list[torch.Tensor]) -> torch.nn.Module:
    """A float checkpoint as vendor_sweep's qtrim variant would PTQ it (prepare + calibrate, a copy); its float
    graph then goes through the TorchScript exporter at λ = 0 (~1 s) instead of torch.export (~30 s)."""
    import copy
    import warnings

    if qtrim_fx.is_prepared(model):
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(copy.deepcopy(model).eval(), (calib[0][:1],))
        qtrim_fx.calibrate(qm, calib)
    return qm.eval()


HTP_NAMES = ("qtrim-embedded", "ort-minmax-pt-u8", "ort-minmax-pc-u8", "ort-pct99.99-pt-u8", "ort-entropy-pc-s8")
HTP_QUICK = ("ort-minmax-pt-u8",)  # one HTP compile per checkpoint in --quick (MobileNetV2: ~15 s each)


def is_per_tensor(v: VendorVariant) -> bool:
    return v.tool != "qtrim" and not v.per_channel


@dataclass
class Row:
    """One recipe on one runtime: score = top-1 (MNIST) or agreement with the original FP32 model (%)."""

    recipe: str
    runtime: str
    per_tensor: bool
    status: str
    score: float | None = None
    sqnr: float | None = None  # logit SQNR vs the checkpoint's own float graph, dB
    message: str = ""


@dataclass
class Sweep:
    """One checkpoint of one seed: its rows and its float scores."""

    checkpoint: str
    seed: int
    fp32_ref: float  # the FP32 checkpoint's float score (the same for every checkpoint of a seed)
    float_score: float  # this checkpoint's own float score
    rows: list[Row] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)  # e.g. labelled-photo top-1 of the float model
    same_as: dict[str, str] = field(default_factory=dict)  # recipe -> earlier recipe whose file had the same bytes

    def group(self, per_tensor: bool) -> list[Row]:
        return [r for r in self.rows if r.per_tensor == per_tensor and r.status == "ok"]

    def stats(self, per_tensor: bool, runtimes: tuple[str, ...] | None = None) -> dict[str, float]:
        rows = [r for r in self.group(per_tensor) if runtimes is None or r.runtime in runtimes]
        if not rows:
            return {}
        scores = [r.score for r in rows]
        worst = min(rows, key=lambda r: r.score)
        sq = [r.sqnr for r in rows if r.sqnr is not None and math.isfinite(r.sqnr)]
        return {"spread": max(scores) - min(scores), "gap": self.fp32_ref - worst.score, "mean": float(np.mean(scores)),
                "worst": f"{worst.recipe} on {worst.runtime}", "sqnr_mean": float(np.mean(sq)) if sq else math.nan,
                "sqnr_min": float(min(sq)) if sq else math.nan}

    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status != "ok"]


def _signal_power(model: torch.nn.Module, x: list[torch.Tensor]) -> float:
    """Mean square of the checkpoint's float logits (for SQNR from vendor_sweep's logit MSE)."""
    was = model.training
    qm = qtrim_fx.is_prepared(model)
    saved = float(model.qtrim_blend.value) if qm else None
    if qm:
        qtrim_fx.set_blend(model, 0.0)
    try:
        with torch.no_grad():
            return float(torch.cat([model.eval()(b) for b in x]).double().pow(2).mean())
    finally:
        model.train(was)
        if qm:
            qtrim_fx.set_blend(model, saved)


def sweep(model: torch.nn.Module, name: str, seed: int, calib: list[torch.Tensor], eval_x: list[torch.Tensor],
          labels: torch.Tensor, variants: tuple[VendorVariant, ...], htp_x: list[torch.Tensor] | None,
          htp_labels: torch.Tensor | None, fp32_ref: float, workdir: Path | None = None,
          htp_names: tuple[str, ...] = HTP_NAMES) -> Sweep:
    """All recipes on ORT + OpenVINO (``eval_x``), the ``htp_names`` recipes on QNN HTP (``htp_x``): the rows
    ``qtrim_fx.vendor_sweep`` gives, each recipe's file made once (benchmarks/_vv_sweep.py)."""
    import tempfile

    import _vv_sweep

    pt = {v.name: is_per_tensor(v) for v in variants}
    model = as_prepared(model, calib)
    hv = tuple(v.name for v in variants if v.name in htp_names) or (variants[0].name,)
    with tempfile.TemporaryDirectory() as tmp:
        work = workdir if workdir is not None else Path(tmp)
        profiles = ("onnxruntime", "openvino") + (("qnn",) if htp_x is not None else ())
        fp32, files = _vv_sweep.make_files(model, calib, eval_x[0], variants, work, profiles)
        parts = [(_vv_sweep.run_files(fp32, files, tuple(pt), eval_x, labels, NO_HTP), _signal_power(model, eval_x))]
        if htp_x is not None:
            parts.append((_vv_sweep.run_files(fp32, files, hv, htp_x, htp_labels, ("qnn",)),
                          _signal_power(model, htp_x)))
    out = Sweep(name, seed, fp32_ref, 100.0 * parts[0][0].float_top1)
    for part, pw in parts:
        out.same_as.update(part.same_as)
        for recipe, rt, status, top1, mse, msg in part.rows:
            sq = None if mse is None else (math.inf if mse == 0 else 10 * math.log10(pw / mse))
            out.rows.append(Row(recipe, rt, pt[recipe], status, None if top1 is None else 100.0 * top1, sq, msg))
    return out


# --- report --------------------------------------------------------------------------------------


def _ms(vals: list[float], fmt: str = "{:.2f}") -> str:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(sd)}"


GROUPS = ((True, "per-tensor"), (False, "per-channel"))
ALL_RT = None
NO_HTP = ("onnxruntime", "openvino")


def render(sweeps: list[Sweep], score: str) -> str:
    """Per checkpoint × granularity: spread and worst gap over recipes × runtimes (mean ± s.d. over seeds)."""
    lines = [f"| checkpoint | weights | float {score} % | spread, ORT+OV (pts) | worst gap to FP32, ORT+OV (pts) "
             "| spread, + HTP subset (pts) | worst gap, + HTP subset (pts) | mean logit SQNR, ORT+OV (dB) "
             "| worst row incl. HTP (last seed) | HTP errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key in NAMES:
        runs = [s for s in sweeps if s.checkpoint == key]
        if not runs:
            continue
        for pt, label in GROUPS:
            st = [s.stats(pt) for s in runs]
            st2 = [s.stats(pt, NO_HTP) for s in runs]
            fails = sum(1 for s in runs for r in s.failures() if r.per_tensor == pt and r.runtime == "qnn")
            lines.append(
                f"| {NAMES[key]} | {label} | {_ms([s.float_score for s in runs])} | "
                f"{_ms([x.get('spread') for x in st2])} | {_ms([x.get('gap') for x in st2])} | "
                f"{_ms([x.get('spread') for x in st])} | {_ms([x.get('gap') for x in st])} | "
                f"{_ms([x.get('sqnr_mean') for x in st2], '{:.1f}')} | {st[-1].get('worst', '-')} | {fails} |")
    return "\n".join(lines)


def verdict(sweeps: list[Sweep]) -> str:
    """The issue's acceptance: Quant-Trim spread ≤ 0.5× FP32's and worst gap ≤ 1 point, per granularity."""
    out = []
    for runtimes, tag in ((NO_HTP, "ORT + OpenVINO, whole eval set"), (ALL_RT, "+ QNN HTP rows (HTP subset)")):
        for pt, label in GROUPS:
            def mean(key: str, stat: str, pt: bool = pt, runtimes: tuple | None = runtimes) -> float:
                vals = [s.stats(pt, runtimes).get(stat) for s in sweeps if s.checkpoint == key]
                vals = [v for v in vals if v is not None]
                return float(np.mean(vals)) if vals else math.nan

            qt, fp, gap = mean("qt", "spread"), mean("fp32", "spread"), mean("qt", "gap")
            ratio = qt / fp if fp > 0 else (math.inf if qt > 0 else 0.0)
            ok = ratio <= 0.5 and gap <= 1.0
            out.append(f"- {label} recipes, {tag}: Quant-Trim spread {qt:.2f} vs FP32 checkpoint {fp:.2f} pts "
                       f"(ratio {ratio:.2f}, goal ≤ 0.5); Quant-Trim worst gap to FP32 {gap:.2f} pts (goal ≤ 1): "
                       f"**{'holds' if ok else 'does NOT hold'}**")
    return "\n".join(out)


def same_file_notes(sweeps: list[Sweep]) -> str:
    """Which recipes made byte-identical files (run once, the rows reused) and in how many sweeps."""
    seen: dict[tuple[str, str], int] = {}
    for s in sweeps:
        for recipe, first in s.same_as.items():
            seen[(recipe, first)] = seen.get((recipe, first), 0) + 1
    if not seen:
        return "- every recipe made a distinct file"
    pairs = ", ".join(f"{r} = {f} ({n} of {len(sweeps)} sweeps)" for (r, f), n in seen.items())
    return f"- byte-identical files, run once and their rows reused (they count as rows of both recipes): {pairs}"


def failure_notes(sweeps: list[Sweep]) -> str:
    seen: dict[str, int] = {}
    for s in sweeps:
        for r in s.failures():
            key = f"{r.recipe} on {r.runtime}: {r.message[:160]}"
            seen[key] = seen.get(key, 0) + 1
    return "\n".join(f"- failure ({n}×): {k}" for k, n in seen.items()) or "- no recipe failed to load or run"


def dump(sweeps: list[Sweep], path: Path) -> None:
    """Every row of every sweep as JSON (the tables and figures can be redrawn from it)."""
    import json
    from dataclasses import asdict

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(s) for s in sweeps], indent=1, default=str))


def load(path: Path) -> list[Sweep]:
    import json

    return [Sweep(**{**d, "rows": [Row(**r) for r in d["rows"]]}) for d in json.loads(path.read_text())]


def per_recipe(sweeps: list[Sweep]) -> dict[str, dict[str, float]]:
    """checkpoint -> recipe -> mean over seeds of (FP32 ref − the recipe's worst runtime score)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for s in sweeps:
        by: dict[str, list[float]] = {}
        for r in s.rows:
            if r.status == "ok":
                by.setdefault(r.recipe, []).append(r.score)
        for recipe, scores in by.items():
            acc.setdefault(s.checkpoint, {}).setdefault(recipe, []).append(s.fp32_ref - min(scores))
    return {k: {r: float(np.mean(v)) for r, v in d.items()} for k, d in acc.items()}


def plot_recipes(sweeps: list[Sweep], path: Path, title: str) -> Path | None:
    """Grouped bars: per recipe, the worst runtime's drop below the FP32 checkpoint, per checkpoint."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    data = per_recipe(sweeps)
    recipes_ = list(dict.fromkeys(r.recipe for s in sweeps for r in s.rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(recipes_) + 2), 4))
    w = 0.8 / max(1, len(data))
    for i, key in enumerate(k for k in NAMES if k in data):
        ax.bar(np.arange(len(recipes_)) + i * w, [data[key].get(r, np.nan) for r in recipes_], w, label=NAMES[key])
    ax.set_xticks(np.arange(len(recipes_)) + w, recipes_, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("FP32 − worst runtime (points)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
