"""Vendor variance: does the checkpoint's low-bit accuracy depend on how a vendor tool quantizes it?

    python benchmarks/vendor_variance.py [--quick] [--seeds 0,1,2] [--bits 8,4] [--no-write]
    python benchmarks/vendor_variance.py --task mnist [--quick] [--seeds 0,1,2] [--no-write]
    python benchmarks/vendor_variance.py --task mobilenetv2 [--quick] [--seeds 0,1,2] [--no-write]

``--task mnist`` / ``--task mobilenetv2`` (issue 23; benchmarks/_vv_*.py): a MobileNetV2-style net
trained from scratch on full MNIST, or the pretrained torchvision MobileNetV2 fine-tuned by
self-distillation on natural-photo crops; FP32, plain-QAT and Quant-Trim checkpoints, each
re-quantized by 14 ORT recipes + our export on ONNX Runtime, OpenVINO and the QNN HTP simulator;
per-tensor and per-channel recipes reported separately. The default task is digits:

Trains the paper-ablation checkpoints (FP32, QAT only, Quant-Trim = QAT + RP 0.95) on digits
with benchmarks/paper_ablation.py's recipe and public-API loop, then runs
``qtrim_fx.vendor_sweep`` on each: ONNX Runtime quantize_static with MinMax / Percentile /
Entropy calibration, per-tensor / per-channel weights, uint8 / int8-symmetric activations,
32 / 256 calibration samples, plus our embedded-scale export, each on ONNX Runtime and
OpenVINO. Reports, per checkpoint, the top-1 spread (max − min over variants and backends),
std of logit MSE, and the worst variant's gap to FP32 — mean ± s.d. over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section
from paper_ablation import ABLATIONS, FULL, QUICK, load_data, post_training_quantize, train

import qtrim_fx
from qtrim_fx.verification.vendors import DEFAULT_VARIANTS, QUICK_VARIANTS

CHECKPOINTS = {"fp32": "FP32 checkpoint", "qat": "QAT-only checkpoint", "qt95": "Quant-Trim checkpoint"}


def _ms(values: list[float], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(sd)}"


def _render(results: dict[tuple[str, int], list[dict]], bits: int) -> str:
    lines = ["| checkpoint | weights | FP32 top-1 % | our QDQ top-1 % | top-1 spread (pts) | worst gap to FP32 (pts) "
             "| std logit MSE |", "|---|---|---|---|---|---|---|"]
    for (key, b), rows in results.items():
        if b != bits:
            continue
        lines.append(
            f"| {CHECKPOINTS[key]} | W{bits}A8 | {_ms([r['fp32_top1'] for r in rows], 100)} | "
            f"{_ms([r['ours_top1'] for r in rows], 100)} | {_ms([r['top1_spread'] for r in rows], 100)} | "
            f"{_ms([r['worst_gap_to_fp32'] for r in rows], 100)} | "
            f"{_ms([r['mse_std'] for r in rows], 1, '{:.2e}')} |")
    text = "\n".join(lines)
    if ("qt95", bits) in results and ("fp32", bits) in results:
        qt = np.mean([r["top1_spread"] for r in results[("qt95", bits)]])
        fp = np.mean([r["top1_spread"] for r in results[("fp32", bits)]])
        gap = np.mean([r["worst_gap_to_fp32"] for r in results[("qt95", bits)]])
        ratio = qt / fp if fp > 0 else float("inf") if qt > 0 else 0.0
        text += (f"\n\n- W{bits}A8: Quant-Trim spread / FP32-checkpoint spread = {ratio:.2f} (goal <= 0.5: "
                 f"{'met' if ratio <= 0.5 else 'NOT met'}); Quant-Trim worst variant {100 * gap:.2f} "
                 f"points below FP32 (goal <= 1: {'met' if gap <= 0.01 else 'NOT met'})")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, tiny model, 3 variants, ORT only")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--act-quantiles", default=None, metavar="LO,HI",
                    help="observer quantile levels p_lo,p_hi of the recipe (default 0.001,0.999); own sections")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--task", choices=("digits", "mnist", "mobilenetv2"), default="digits")
    args = ap.parse_args(argv)
    if args.task != "digits":
        from _vv_tasks import main_task

        warnings.simplefilter("ignore")
        seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
        cmd = "python benchmarks/vendor_variance.py " + " ".join(argv if argv is not None else sys.argv[1:])
        return main_task(args.task, args.quick, seeds, not args.no_write, cmd.strip())
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    recipe = QUICK if args.quick else FULL
    title = "Vendor variance, W{bits}A8"
    if args.act_quantiles:
        try:
            p_lo, p_hi = (float(v) for v in args.act_quantiles.split(","))
        except ValueError:
            raise SystemExit(f"--act-quantiles takes LO,HI (e.g. 1e-5,0.99999), got {args.act_quantiles!r}") from None
        recipe = dataclasses.replace(recipe, p_lo=p_lo, p_hi=p_hi)
        title += f", quantiles {p_lo:g} / {p_hi:g}"
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    bits_list = [8] if args.quick else [int(b) for b in args.bits.split(",")]
    variants = QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS
    backends = ("onnxruntime",) if args.quick else ("onnxruntime", "openvino")
    data = load_data(recipe.image_size)
    calib = data.calibration(recipe)
    n_eval = 128 if args.quick else len(data.test_y)
    evaluation = [(data.test_x[i:i + 128], torch.as_tensor(data.test_y[i:i + 128])) for i in range(0, n_eval, 128)]
    results: dict[tuple[str, int], list[dict]] = {}
    elapsed: dict[int, float] = dict.fromkeys(bits_list, 0.0)
    for seed in seeds:
        for key in CHECKPOINTS:
            ab = ABLATIONS[key]
            fp32_model = None
            for bits in bits_list:
                start = time.perf_counter()
                if ab.fake_quant:  # QAT checkpoints are trained for their weight width
                    qm = train(ab, recipe, data, seed, weight_bits=bits).qm
                else:  # one FP32 training per seed serves every width
                    if fp32_model is None:
                        fp32_model = train(ab, recipe, data, seed).model
                    qm = post_training_quantize(fp32_model, recipe, data, bits)
                report = qtrim_fx.vendor_sweep(qm, calib, evaluation, variants=variants,
                                               backends=backends, weight_bits=bits)
                elapsed[bits] += time.perf_counter() - start
                spread = report.spread()
                spread["fp32_top1"] = report.fp32_top1
                spread["ours_top1"] = min(r.top1 for r in report.ok_rows() if r.variant == "qtrim-embedded")
                results.setdefault((key, bits), []).append(spread)
                print(f"seed {seed} {key} W{bits}A8: FP32 {100 * report.fp32_top1:.1f}%, "
                      f"spread {100 * spread['top1_spread']:.2f} pts, worst {spread['worst']} "
                      f"({100 * spread['worst_top1']:.1f}%)", flush=True)
    cmd = "python benchmarks/vendor_variance.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for bits in bits_list:
        text = _render(results, bits)
        print(text)
        print(f"({elapsed[bits]:.0f} s)")
        if not args.no_write:
            # One section per weight width, so a run of one width keeps the other's figures.
            write_section(
                title.format(bits=bits),
                f"Command: `{cmd.strip()}`  \nMachine: {machine()}  \nRecipe: {recipe.describe()}; seeds {seeds}; "
                f"{len(variants)} variants x {len(backends)} backends ({', '.join(backends)}); test split "
                f"({n_eval} digits); 1 digit = {100 / n_eval:.2f} points. Mean ± s.d. over seeds; "
                f"{elapsed[bits]:.0f} s for this width.\n\n{text}",
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
