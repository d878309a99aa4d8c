"""vendor_sweep: independent tools quantize the float graph; every variant runs on ORT and OpenVINO."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from qtrim_fx.models import get_model

import qtrim_fx
from qtrim_fx.verification.vendors import QUICK_VARIANTS, VendorVariant, vendor_sweep


def _data(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def test_sweep_on_a_prepared_checkpoint_with_labels(tmp_path):
    model, (_x,) = get_model("tiny_convnet", batch_size=16)
    qm = qtrim_fx.prepare(model)
    calib = _data((16, 3, 16, 16), 3, 0)
    qtrim_fx.calibrate(qm, calib)
    ev = [(b, torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(i)))
          for i, b in enumerate(_data((16, 3, 16, 16), 2, 1))]
    variants = (*QUICK_VARIANTS, VendorVariant("ort-pct", method="percentile", percentile=99.99, calib_size=32))
    report = vendor_sweep(qm, calib, ev, variants=variants, workdir=tmp_path)
    assert {r.variant for r in report.rows} == {v.name for v in variants}
    assert {r.backend for r in report.rows} == {"onnxruntime", "openvino"}
    assert all(r.status == "ok" for r in report.rows), [r.message for r in report.rows]
    assert 0.0 <= report.fp32_top1 <= 1.0
    for r in report.rows:
        assert 0.0 <= r.top1 <= 1.0 and r.logit_mse >= 0.0
    s = report.spread()
    assert s["top1_spread"] >= 0 and s["worst"] is not None
    assert float(qm.qtrim_blend.value) == 0.0  # λ restored
    assert (tmp_path / "fp32.onnx").exists() and (tmp_path / "ort-pct.onnx").exists()
    d = json.loads(report.to_json(tmp_path / "r.json"))
    assert d["spread"]["all"]["top1_spread"] == s["top1_spread"]
    report.plot(tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "spread" in report.table() and "| variant |" in report.to_markdown()


def test_float_model_is_prepared_and_a_failing_variant_is_reported():
    model, _ = get_model("tiny_mlp", batch_size=8)
    calib = _data((8, 64), 2, 0)
    bad = VendorVariant("bad-method", method="histogram-of-doom")
    report = vendor_sweep(model, calib, _data((8, 64), 1, 1), variants=(QUICK_VARIANTS[0], bad),
                          backends=("onnxruntime",))
    rows = {r.variant: r for r in report.rows}
    assert rows["qtrim-embedded"].status == "ok"
    # Without labels top-1 is agreement with the FP32 model's classes: an INT8 model agrees on most.
    assert rows["qtrim-embedded"].top1 >= 0.75, rows["qtrim-embedded"]
    assert rows["bad-method"].status == "error" and "histogram-of-doom" in rows["bad-method"].message


def test_cli_vendors(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "qtrim_fx.tools.cli", "vendors", "tiny_convnet", "--variants", "quick",
         "--backends", "onnxruntime", "--calib-batches", "2", "--eval-batches", "2",
         "--json", str(tmp_path / "v.json"), "--plot", str(tmp_path / "v.png")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "ort-minmax-pc-u8" in out.stdout and "spread" in out.stdout
    d = json.loads((tmp_path / "v.json").read_text())
    assert len(d["rows"]) == len(QUICK_VARIANTS)
    assert (tmp_path / "v.png").stat().st_size > 0


def test_reused_workdir_exports_this_models_files(tmp_path):
    calib = _data((8, 64), 2, 0)
    runs = []
    for seed in (0, 1):
        model, _ = get_model("tiny_mlp", batch_size=8, seed=seed)
        report = vendor_sweep(model, calib, _data((8, 64), 1, 1), variants=(QUICK_VARIANTS[0],),
                              backends=("onnxruntime",), workdir=tmp_path)
        runs.append((tmp_path / "qtrim-embedded.onnxruntime.onnx").read_bytes())
        (row,) = report.rows
        assert row.top1 >= 0.75, row  # agrees with *this* model's FP32 classes
    assert runs[0] != runs[1]  # the second sweep wrote its own file
