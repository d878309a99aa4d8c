"""Drivers of ``vendor_variance.py --task mnist`` and ``--task mobilenetv2``: train, sweep, report."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _vv_common as common
import _vv_mnist as mn
import _vv_mobilenet as mb
import numpy as np
import torch
from _common import machine, write_section

SECTIONS = {"mnist": "Vendor variance: MNIST", "mobilenetv2": "Vendor variance: pretrained MobileNetV2"}


def _log(msg: str) -> None:
    print(msg, flush=True)


def _batches(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    return list(x[:n].split(256))


def run_mnist(quick: bool, seeds: list[int], log=_log, on_seed=None) -> tuple[list[common.Sweep], str, dict]:
    r = mn.QUICK if quick else mn.FULL
    variants = common.quick_recipes(r.calib_small) if quick else common.recipes(r.calib_large, r.calib_small)
    sweeps, secs = [], {}
    for seed in seeds:
        ckpts, calib, tx, ty, s = mn.checkpoints(r, seed, log)
        for k, v in s.items():
            secs[k] = secs.get(k, 0.0) + v
        with torch.no_grad():
            ref = 100.0 * float((ckpts["fp32"](tx).argmax(1) == ty).float().mean())
        for key, model in ckpts.items():
            t = time.perf_counter()
            sw = common.sweep(model, key, seed, calib, _batches(tx, len(ty)), ty, variants,
                              _batches(tx, r.htp_images), ty[: r.htp_images], ref,
                              htp_names=common.HTP_QUICK if quick else common.HTP_NAMES)
            secs["sweeps"] = secs.get("sweeps", 0.0) + time.perf_counter() - t
            sweeps.append(sw)
            _report_one(sw, log, time.perf_counter() - t)
        if on_seed is not None:
            on_seed(sweeps, r.describe() + f"; {len(variants)} recipes", secs)
    return sweeps, r.describe() + f"; {len(variants)} recipes", secs


def _report_one(sw: common.Sweep, log, seconds: float) -> None:
    for pt, label in common.GROUPS:
        st = sw.stats(pt)
        if st:
            log(f"seed {sw.seed} {sw.checkpoint:4s} {label:11s}: float {sw.float_score:.2f}, spread "
                f"{st['spread']:.2f}, gap {st['gap']:.2f}, worst {st['worst']} ({seconds:.0f} s)")
    for r in sw.failures():
        log(f"    failure: {r.recipe} on {r.runtime}: {r.message[:120]}")


def run_mobilenet(quick: bool, seeds: list[int], log=_log, on_seed=None,
                  figures: bool = True) -> tuple[list[common.Sweep], str, dict]:
    r = mb.QUICK if quick else mb.FULL
    variants = common.quick_recipes(r.calib_small, ours=False) if quick else common.recipes(r.calib_large, r.calib_small)
    teacher = mb.pretrained()
    train, held, photos = mb.photo_split()
    lx, ly = mb.labelled(r.size)
    sweeps, secs, last_qt = [], {}, None
    for seed in seeds:
        calib, ev = mb.data(r, seed, train, held)
        with torch.no_grad():
            labels = torch.cat([teacher(b) for b in ev]).argmax(1)
        ckpts, floats, s = mb.checkpoints(r, seed, teacher, train, calib, log)
        last_qt = floats["qt"]
        for k, v in s.items():
            secs[k] = secs.get(k, 0.0) + v
        for key, model in ckpts.items():
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                htp = list(torch.cat(ev)[: r.htp_crops].split(r.htp_crops))
                sw = common.sweep(model, key, seed, calib, ev, labels, variants, htp, labels[: r.htp_crops], 100.0,
                                  workdir=Path(tmp), htp_names=common.HTP_QUICK if quick else common.HTP_NAMES)
                lab = mb.labelled_top1(Path(tmp), lx, ly)
            sw.extra = {"labelled float": lab.get("fp32", float("nan")),
                        "labelled min": min((v for k, v in lab.items() if k != "fp32"), default=float("nan")),
                        "labelled max": max((v for k, v in lab.items() if k != "fp32"), default=float("nan"))}
            secs["sweeps"] = secs.get("sweeps", 0.0) + time.perf_counter() - t
            sweeps.append(sw)
            _report_one(sw, log, time.perf_counter() - t)
            log(f"    labelled photos top-1 (ORT): float {sw.extra['labelled float']:.0f} %, recipes "
                f"{sw.extra['labelled min']:.0f}–{sw.extra['labelled max']:.0f} %")
        if on_seed is not None:
            on_seed(sweeps, f"{r.describe()}; {photos}; {len(variants)} recipes", secs)
    plots = []
    if figures and not quick and last_qt is not None:
        plots.append(mb.plot_weights(teacher, last_qt, common.PLOTS / "vendor_variance_mobilenetv2_dw_weights.png"))
    return sweeps, f"{r.describe()}; {photos}; {len(variants)} recipes", {**secs, "_plots": plots}


def labelled_table(sweeps: list[common.Sweep]) -> str:
    lines = ["| checkpoint | labelled top-1, float (ORT) % | labelled top-1, worst recipe % | best recipe % |",
             "|---|---|---|---|"]
    for key, name in common.NAMES.items():
        runs = [s for s in sweeps if s.checkpoint == key and s.extra]
        if runs:
            lines.append(f"| {name} | {common._ms([s.extra['labelled float'] for s in runs], '{:.0f}')} | "
                         f"{common._ms([s.extra['labelled min'] for s in runs], '{:.0f}')} | "
                         f"{common._ms([s.extra['labelled max'] for s in runs], '{:.0f}')} |")
    return "\n".join(lines)


def _write(task: str, quick: bool, seeds: list[int], done: list[int], write: bool, cmd: str,
           sweeps: list[common.Sweep], recipe: str, secs: dict, elapsed: float, plots: list[Path]) -> str:
    score = "top-1" if task == "mnist" else "agreement"
    text = common.render(sweeps, score)
    if task == "mobilenetv2":
        text += "\n\n" + labelled_table(sweeps)
    text += "\n\nAcceptance (issue 23):\n" + common.verdict(sweeps) + "\n\n" + common.failure_notes(sweeps)
    text += "\n" + common.same_file_notes(sweeps)
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in secs.items() if not k.startswith("_"))
    if write:
        partial = "" if done == seeds else f" **Partial: seeds {done} of {seeds} finished so far.**"
        figs = ("No figure from this call (matplotlib missing, or a partial write)" if not plots else
                "Figures: " + ", ".join(f"`benchmarks/plots/{p.name}`" for p in plots))
        htp = common.HTP_QUICK if quick else common.HTP_NAMES
        write_section(SECTIONS[task], f"Command: `{cmd}`  \nMachine: {machine()}, torch 1 thread  \n"
                      f"Recipe: {recipe}; seeds {done}.{partial} Runtimes: ONNX Runtime CPU, OpenVINO CPU (f32 hint) "
                      "on every recipe and the whole evaluation set; QNN HTP simulator (onnxruntime-qnn, strict) on "
                      f"{', '.join(htp)} over the HTP subset. Spread = best − worst {score} over the group's "
                      f"recipes × runtimes; gap = FP32 checkpoint's float {score} − worst row; mean ± s.d. over "
                      f"seeds. {elapsed:.0f} s in all ({timing}). {figs}.\n\n{text}")
    return text + f"\n({elapsed:.0f} s: {timing})"


def main_task(task: str, quick: bool, seeds: list[int], write: bool, cmd: str) -> int:
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()

    def on_seed(sweeps: list[common.Sweep], recipe: str, secs: dict) -> None:
        done = sorted({s.seed for s in sweeps})
        if write and not quick:  # every row, and the recipe figure, after each seed: a run cut short keeps them
            common.dump(sweeps, common.PLOTS / f"vendor_variance_{task}_rows.json")
            common.plot_recipes(sweeps, common.PLOTS / f"vendor_variance_{task}_recipes.png",
                                f"{SECTIONS[task]}: FP32 − worst runtime per recipe (mean over seeds {done})")
        if done != seeds:  # a partial section, replaced by the final one
            _write(task, quick, seeds, done, write, cmd, sweeps, recipe, secs, time.perf_counter() - start, [])

    try:
        if task == "mnist":
            sweeps, recipe, secs = run_mnist(quick, seeds, on_seed=on_seed)
        else:  # --no-write leaves the committed figures alone too
            sweeps, recipe, secs = run_mobilenet(quick, seeds, on_seed=on_seed, figures=write)
    finally:
        torch.set_num_threads(prev)
    plots = [p for p in secs.pop("_plots", []) if p is not None]
    recipe_png = common.PLOTS / f"vendor_variance_{task}_recipes.png"
    if write and not quick and recipe_png.exists():
        plots.append(recipe_png)
    print(_write(task, quick, seeds, seeds, write, cmd, sweeps, recipe, secs, time.perf_counter() - start, plots))
    return 0 if all(np.isfinite(s.stats(True).get("spread", np.nan)) for s in sweeps) else 1
