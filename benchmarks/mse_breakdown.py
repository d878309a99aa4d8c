"""Where the paper ablation's logit MSE comes from: weights vs activations, clipping vs rounding.

    python benchmarks/mse_breakdown.py [--seed 0] [--no-write]

Trains the FP32 and the Quant-Trim (QAT + RP 0.95) checkpoints of benchmarks/paper_ablation.py
(same recipe, data and public-API loop; one seed) and measures, on the test split, the logit MSE
of each checkpoint's W8A8 model against its own float model (λ = 0), with

- every site quantized (what the exported QDQ file computes: the ablation's parity SQNR is ~40 dB),
- weight sites only, activation sites only (the others left in float),
- activations re-calibrated with wider quantiles (p = 1e-5 / 0.99999) and with min/max
  (p -> 0 / 1), which separates the clipping of activation tails from rounding.

The models are evaluated in PyTorch (fake quantization at λ = 1, eval mode); the QDQ files the
ablation exports reproduce them to ~40 dB SQNR on ONNX Runtime and OpenVINO.
Writes the section "Paper ablation: logit MSE breakdown" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section
from paper_ablation import ABLATIONS, FULL, load_data, post_training_quantize, train

import qtrim_fx

WIDE = (1e-5, 1 - 1e-5)
MINMAX = (1e-9, 1 - 1e-9)  # quantile levels at the extreme order statistics: min and max


@torch.no_grad()
def _logits(qm: torch.nn.Module, x: torch.Tensor, lam: float) -> torch.Tensor:
    qtrim_fx.set_blend(qm, lam)
    qm.eval()
    return qm(x)


def _only(qm: torch.nn.Module, kind: str | None) -> None:
    """Enable the sites of one kind (None: all)."""
    for spec, site, _ in qtrim_fx.iter_sites(qm):
        site.enabled = kind is None or spec.kind == kind


def _recalibrate(qm: torch.nn.Module, batches: list[torch.Tensor], levels: tuple[float, float], lam: float) -> None:
    """Activation statistics from scratch at other quantile levels (weights keep theirs), at blend ``lam``."""
    for spec, site, _ in qtrim_fx.iter_sites(qm):
        if spec.kind == "activation":
            site.observer.p_lo, site.observer.p_hi = levels
            site.observer.enabled = True
        else:
            site.observer.enabled = False
    qtrim_fx.set_blend(qm, lam)
    qtrim_fx.calibrate(qm, batches)
    for _, site, _ in qtrim_fx.iter_sites(qm):
        site.observer.enabled = True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    recipe = FULL
    data = load_data(recipe.image_size)
    calib = data.calibration(recipe)
    x, y = data.test_x, torch.as_tensor(data.test_y)
    rows: list[tuple[str, str, float, float]] = []
    start = time.perf_counter()
    for key in ("fp32", "qt95"):
        ab = ABLATIONS[key]
        trained = train(ab, recipe, data, args.seed)
        qm = trained.qm if ab.fake_quant else post_training_quantize(trained.model, recipe, data, 8)
        ref = _logits(qm, x, 0.0)
        power = float(ref.pow(2).mean())

        def measure(label: str, qm=qm, ref=ref, power=power, ab=ab) -> None:
            out = _logits(qm, x, 1.0)
            mse = float((out - ref).pow(2).mean())  # per logit, as qtrim_fx.verify and the ablation table
            top1 = float((out.argmax(1) == y).float().mean())
            rows.append((ab.label, label, mse, top1))
            print(f"{ab.label:28s} {label:44s} MSE {mse:.3e}  ({power:.2f} mean logit²)  top-1 {100 * top1:.2f}%",
                  flush=True)

        _only(qm, None)
        measure("all sites (the exported model)")
        _only(qm, "weight")
        measure("weights only")
        _only(qm, "activation")
        measure("activations only")
        for levels, name in ((WIDE, "p = 1e-5 / 0.99999"), (MINMAX, "min / max")):
            # At the blend the statistics were taken at: λ = 0 for PTQ, λ = 1 at the end of QAT.
            _recalibrate(qm, calib, levels, 1.0 if ab.fake_quant else 0.0)
            _only(qm, None)
            measure(f"all sites, activations re-calibrated at {name}")
            _only(qm, "activation")
            measure(f"activations only, re-calibrated at {name}")
        _only(qm, None)
    elapsed = time.perf_counter() - start
    lines = ["| checkpoint | quantized | logit MSE | top-1 % |", "|---|---|---:|---:|"]
    lines += [f"| {ck} | {what} | {mse:.3e} | {100 * t:.2f} |" for ck, what, mse, t in rows]
    table = "\n".join(lines)
    print(table)
    print(f"({elapsed:.0f} s)")
    if not args.no_write:
        cmd = "python benchmarks/mse_breakdown.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(
            "Paper ablation: logit MSE breakdown",
            f"Command: `{cmd.strip()}`  \nMachine: {machine()}  \nRecipe: {recipe.describe()}; seed {args.seed}; "
            f"test split ({len(y)} digits); MSE = mean squared difference per logit between the "
            f"W8A8 model's logits and the same checkpoint's float logits (PyTorch, λ = 1 vs λ = 0, eval); "
            f"activation re-calibration: {recipe.calib_batches} training batches. {elapsed:.0f} s.\n\n{table}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
