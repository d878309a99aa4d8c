"""qtrim_fx.tools.plots: every function writes a valid PNG, takes the inputs it documents and refuses the rest."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

pytest.importorskip("matplotlib")

import matplotlib.pyplot as plt

from qtrim_fx import Curriculum, ReversePruner
from qtrim_fx.tools.plots import plot_curriculum, plot_layer_sqnr, plot_weight_distributions
from qtrim_fx.verification.run import LayerMetrics, PerLayerReport, VerifyReport

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(autouse=True)
def no_figures_left_open():
    yield
    assert plt.get_fignums() == []  # every plot closes its figure


def _weights(n: int) -> tuple[dict, dict, dict]:
    gen = torch.Generator().manual_seed(0)
    before, after, taus = {}, {}, {}
    for i in range(n):
        w = torch.randn(16 * (i + 1), 8, 3, 3, generator=gen) * 0.05
        w[0, 0, 0, 0] = 1.0  # an outlier for reverse pruning to clip
        tau = w.abs().flatten().quantile(0.95)
        before[f"layer{i}.conv.weight"], after[f"layer{i}.conv.weight"], taus[f"layer{i}.conv.weight"] = (
            w, w.clamp(-tau, tau), tau
        )
    return before, after, taus


def test_weight_distributions(tmp_path):
    before, after, taus = _weights(3)
    path = plot_weight_distributions(before, after, tmp_path / "w.png", thresholds=taus)
    assert path == tmp_path / "w.png"
    w, h = _png_size(path)
    assert w > h > 200  # one row of three panels


def test_weight_distributions_limits_panels(tmp_path):
    before, after, _ = _weights(10)
    one_row = _png_size(plot_weight_distributions(before, after, tmp_path / "a.png", max_layers=3))
    two_rows = _png_size(plot_weight_distributions(before, after, tmp_path / "b.png", max_layers=6))
    assert one_row[0] == two_rows[0] and two_rows[1] > 1.5 * one_row[1]


def test_weight_distributions_per_channel_tau_and_missing_layers(tmp_path):
    before, after, _ = _weights(2)
    taus = {"layer0.conv.weight": torch.full((16,), 0.1)}  # per-channel τ: the largest is marked
    after.pop("layer1.conv.weight")  # only layers present in both are drawn
    assert plot_weight_distributions(before, after, tmp_path / "w.png", thresholds=taus).exists()


def test_weight_distributions_rejects_nothing_to_plot(tmp_path):
    with pytest.raises(ValueError, match="share no layer"):
        plot_weight_distributions({"a": torch.ones(3)}, {"b": torch.ones(3)}, tmp_path / "w.png")
    with pytest.raises(ValueError, match="max_layers"):
        plot_weight_distributions({"a": torch.ones(3)}, {"a": torch.ones(3)}, tmp_path / "w.png", max_layers=0)


@pytest.mark.parametrize(
    ("curriculum", "pins"),
    [
        (Curriculum(10, 50, 20), ReversePruner(p_clip=0.95, every=5)),
        (Curriculum(5, 30, 10, max_blend=0.8), [5, 12]),
        (Curriculum(2, 4, 1), None),
    ],
)
def test_curriculum(curriculum, pins, tmp_path):
    path = plot_curriculum(curriculum, 80, tmp_path / "sub" / "c.png", pins=pins)  # folders are created
    w, h = _png_size(path)
    assert w > h > 200


def test_curriculum_rejects_no_epochs(tmp_path):
    with pytest.raises(ValueError, match="epochs"):
        plot_curriculum(Curriculum(), 0, tmp_path / "c.png")


def _layer_report(n: int) -> VerifyReport:
    layers = [
        LayerMetrics(f"layer{i}", "DequantizeLinear" if i % 2 else "Conv", f"t{i}", f"r{i}", "tensor name",
                     mse=1e-4, sqnr_db=20.0 + i, max_abs_err=0.1, cosine=0.999)
        for i in range(n)
    ]
    layers[0].sqnr_db = math.inf
    layers[1].sqnr_db = math.nan
    pl = PerLayerReport(layers=layers, worst=[la.layer for la in layers[:5]])
    return VerifyReport("m.onnx", "torch", 1, 2, ["y"], per_layer=pl)


def test_layer_sqnr_from_report_dict_json_and_per_layer(tmp_path):
    report = _layer_report(12)
    sizes = [
        _png_size(plot_layer_sqnr(report, tmp_path / "a.png")),
        _png_size(plot_layer_sqnr(report.to_dict(), tmp_path / "b.png")),
        _png_size(plot_layer_sqnr(json.loads(report.to_json()), tmp_path / "c.png")),  # "inf" / "nan" strings
        _png_size(plot_layer_sqnr(report.per_layer, tmp_path / "d.png")),
    ]
    assert len(set(sizes)) == 1


def test_layer_sqnr_grows_with_layers_and_caps(tmp_path):
    few = _png_size(plot_layer_sqnr(_layer_report(4), tmp_path / "few.png"))
    many = _png_size(plot_layer_sqnr(_layer_report(40), tmp_path / "many.png"))
    capped = _png_size(plot_layer_sqnr(_layer_report(40), tmp_path / "capped.png", max_layers=10))
    assert many[1] > 3 * few[1] and capped[1] < many[1]


def test_layer_sqnr_needs_per_layer_figures(tmp_path):
    report = VerifyReport("m.onnx", "torch", 1, 2, ["y"])
    with pytest.raises(ValueError, match="per_layer=True"):
        plot_layer_sqnr(report, tmp_path / "x.png")
    report.per_layer = PerLayerReport(status="error", message="no shared names")
    with pytest.raises(ValueError, match="no shared names"):
        plot_layer_sqnr(report, tmp_path / "x.png")
    with pytest.raises(TypeError):
        plot_layer_sqnr(42, tmp_path / "x.png")
