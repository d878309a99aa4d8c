"""SiLU / HardSwish on integer-only targets: no float gate in the file, and the file computes the lowered model.

Prepared for ``qnn`` / ``npu``, ``x · gate(x)`` exports as ``Sigmoid (HardSigmoid) -> Q -> DQ -> Mul -> Q``:
``check`` of the target finds nothing, and ONNX Runtime (no graph optimizations) agrees with the lowered
torch model to within one output LSB. A file with a float gate is named by ``check`` as the activation
it is. On ``npu`` (int8 activations) a LayerNorm's γ is stored int8, as its ``check`` requires.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.onnx import check


def _net(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act, nn.Conv2d(8, 4, 1)).eval()


def _batches(n: int = 3) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(2, 3, 8, 8, generator=g),) for _ in range(n)]


def _export(model: nn.Module, target: str | None, export_target: str, path) -> tuple[object, tuple[torch.Tensor]]:
    x = _batches(1)[0]
    qm = qtrim_fx.prepare(model, x, **({"target": target} if target else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fresh BatchNorm statistics; float ops of the unprepared case
        qtrim_fx.calibrate(qm, _batches())
        qtrim_fx.set_blend(qm, 1.0)
        qtrim_fx.export_onnx(qm.eval(), x, str(path), target=export_target)  # its self-check runs ORT too
    return qm, x


def _ort(path, x: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _output_scale(path) -> float:
    g = onnx.load(str(path)).graph
    dq = next(n for n in reversed(g.node) if n.op_type == "DequantizeLinear" and n.output[0] == g.output[0].name)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"}
    return float({**init, **consts}[dq.input[1]])


@pytest.mark.parametrize(("act", "gate"), [(nn.SiLU, "Sigmoid"), (nn.Hardswish, "HardSigmoid")])
@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_gated_activation_exports_clean_and_matches_the_lowered_model(act, gate, target, tmp_path):
    path = tmp_path / f"{target}.onnx"
    qm, x = _export(_net(act()), target, target, path)
    assert check(str(path), target) == []
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    single = "HardSwish" in ops
    assert single == (act is nn.Hardswish and target == "qnn")  # opset 20 has HardSwish; opset 13 does not
    if not single:  # the gate is quantized between its two ops: Gate -> Q -> DQ -> Mul -> Q
        i = ops.index(gate)
        assert ops[i:i + 5] == [gate, "QuantizeLinear", "DequantizeLinear", "Mul", "QuantizeLinear"]
    lowered = qtrim_fx.lower(qm, target)
    with torch.no_grad():
        want = lowered(*x).numpy()
    got = _ort(path, x[0])
    lsb = _output_scale(path)
    off = np.abs(got - want) > 1.01 * lsb
    assert not off.any(), f"{off.mean():.2%} of outputs more than one LSB ({lsb:.3g}) from the lowered model"
    assert np.abs(got - want).max() <= 1.01 * lsb


@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_check_names_a_float_gate_as_the_activation_it_is(target, tmp_path):
    path = tmp_path / "default.onnx"
    _export(_net(nn.SiLU()), None, target, path)  # prepared without target=: one site, on the product
    found = [v for v in check(str(path), target) if v.rule == "float_op"]
    assert {v.message.split(" ", 1)[0] for v in found} == {"Sigmoid", "Mul"}
    assert all(v.severity == "error" and "silu written as x * its gate" in v.message for v in found)


def test_npu_layernorm_gamma_is_stored_on_the_int8_activation_grid(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 6)
    qm = qtrim_fx.prepare(model, (x,), target="npu")
    qtrim_fx.calibrate(qm, [(x,), (0.5 * x,)])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "ln.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.export_onnx(qm.eval(), (x,), str(path), target="npu", opset=17)  # LayerNormalization: opset 17
    assert [v for v in check(str(path), "npu") if v.rule == "activation_dtype"] == []
    # β stays float (npu takes float biases) and check agrees: the file passes its own target's check
    assert [v for v in check(str(path), "npu") if v.severity == "error"] == []
    g = onnx.load(str(path)).graph
    ln = next(n for n in g.node if n.op_type == "LayerNormalization")
    dq = next(n for n in g.node if n.output[0] == ln.input[1])
    assert dq.op_type == "DequantizeLinear"
    codes = next(i for i in g.initializer if i.name == dq.input[0])
    assert codes.data_type == onnx.TensorProto.INT8
