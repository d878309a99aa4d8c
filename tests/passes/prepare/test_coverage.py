"""Every parameter-holding op is quantized or named with the reason (issue 17, item 3)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.fx
from torch import nn

import qtrim_fx
from qtrim_fx.core.errors import ConfigError, CoverageError, CoverageWarning


@torch.fx.wrap
def wrapped_projection(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.t()


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: ``addmm(bias, x.view(-1, nx), weight)`` with weight (nx, nf)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.weight.size(-1),)  # noqa: RUF005 (Hugging Face's code as written)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Everything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.c_fc = Conv1D(8, 8)
        self.bw = nn.Parameter(torch.randn(8, 8) * 0.2)
        self.w_wrapped = nn.Parameter(torch.randn(8, 8) * 0.2)
        self.ew = nn.Parameter(torch.randn(8, 8) * 0.2)
        self.head = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x, _ = self.lstm(self.emb(ids))
        x = self.c_fc(x)
        x = torch.baddbmm(x, x, self.bw.expand(x.shape[0], 8, 8))
        x = torch.einsum("bsi,oi->bso", x, self.ew)
        x = wrapped_projection(x, self.w_wrapped)
        return self.head(x)


def _prepare(config=None):
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = qtrim_fx.prepare(Everything(), config=config)
    return qm, [w for w in caught if issubclass(w.category, CoverageWarning)]


def test_addmm_baddbmm_and_einsum_weights_are_quantized():
    qm, _ = _prepare()
    weights = {s.param: s for s, _, _ in qtrim_fx.iter_sites(qm) if s.kind == "weight"}
    assert {"c_fc.weight", "bw", "ew", "head.weight"} <= weights.keys()
    assert weights["c_fc.weight"].channel_axis == 1  # (nx, nf): output channels on axis 1


def test_float_weights_are_listed_with_the_reason_in_one_warning_and_in_inspect():
    config = qtrim_fx.QuantConfig(overrides=(qtrim_fx.Override(name="head", exclude=True),))
    qm, caught = _prepare(config)
    assert len(caught) == 1  # one summarised warning
    msg = str(caught[0].message)
    expected = {
        "emb.weight": "embedding",
        "lstm.weight_ih_l0": "recurrent",
        "lstm.weight_hh_l0": "recurrent",
        "w_wrapped": "wrapped function",
        "head.weight": "excluded by config",
    }
    for param in expected:
        assert param in msg, param
    report = qtrim_fx.inspect(qm)
    rows = {p: why for p, _op, why in report.float_weights}
    assert rows.keys() == expected.keys()
    for param, why in expected.items():
        assert why in rows[param]
    assert "c_fc.weight" not in rows and "bw" not in rows  # quantized: not listed
    table = str(report)
    assert "float (not quantized): 5 weight(s)" in table and "lstm.weight_hh_l0 (nn.LSTM)" in table
    assert report.to_dict()["float_weights"]


def test_coverage_error_names_the_sites_and_ignore_is_silent():
    with pytest.raises(CoverageError) as info:
        _prepare(qtrim_fx.QuantConfig(coverage="error"))
    assert isinstance(info.value, ConfigError)
    assert "lstm.weight_ih_l0" in str(info.value) and "w_wrapped" in str(info.value)
    _, caught = _prepare(qtrim_fx.QuantConfig(coverage="ignore"))
    assert caught == []
    with pytest.raises(ConfigError, match="coverage"):
        qtrim_fx.QuantConfig(coverage="loud")


def test_only_deliberate_exclusions_do_not_make_coverage_error_fail():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    config = qtrim_fx.QuantConfig(coverage="error", overrides=(qtrim_fx.Override(name="2", exclude=True),))
    with pytest.warns(CoverageWarning, match="excluded by config"):
        qm = qtrim_fx.prepare(model, config=config)
    assert [p for p, _, _ in qtrim_fx.inspect(qm).float_weights] == ["2.weight"]


def test_fully_quantized_model_gives_no_coverage_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        qm = qtrim_fx.prepare(model)
    assert qtrim_fx.inspect(qm).float_weights == ()


def test_gpt2_style_addmm_exports_with_integer_weights(tmp_path):
    """Before: Conv1D's addmm weight stayed a float initializer of the Gemm (8 of 13 Gemms in GPT-2)."""
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(16, 8), nn.GELU(), Conv1D(8, 16)).eval()
    x = torch.randn(2, 5, 8)
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "m.onnx"
    m = qtrim_fx.export_onnx(qm.eval(), (x,), path)
    inits = {t.name: t for t in m.graph.initializer}
    float_matrices = [t.name for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    assert float_matrices == []
    int_weights = [t for t in inits.values() if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int_weights) == 2
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = qm(x).numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
