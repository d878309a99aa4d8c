"""Weights computed from parameters (weight standardization, weight norm) are quantized as computed.

timm's ``StdConv2d`` (BiT, ``resnetv2_*``) normalizes its weight with ``F.batch_norm`` before the conv, and
``torch.nn.utils.parametrizations.weight_norm`` (HF Wav2Vec2's positional conv, audio vocoders) computes it
from ``g`` and ``v``: their weights reached the conv through computation, so no weight site took them and
they stayed float (listed by the coverage warning). Now the site sits on the computed weight: trained as
computed (gradients reach the parameters), its statistics sized at prepare, never pruned nor BN-folded, and
lowering stores its value as a constant so the file holds integer codes.
"""

from __future__ import annotations

import copy
import warnings

import onnx
import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.core.errors import CoverageWarning
from qtrim_fx.onnx import check

timm_layers = pytest.importorskip("timm.layers")


def _net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        timm_layers.StdConv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 4, 3)), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(8, 3, 8, 8)
    model.train()
    with torch.no_grad():
        model(x)  # BatchNorm statistics that describe this data
    return model.eval()


def _prepared(target: str | None = None) -> tuple[nn.Module, torch.nn.Module, torch.Tensor]:
    model = _net()
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)  # nothing is left float
        qm = qtrim_fx.prepare(copy.deepcopy(model), (x,), target=target)
    return model, qm, x


def test_computed_weights_get_sites_sized_at_prepare_and_exact_at_lambda_0() -> None:
    model, qm, x = _prepared()
    derived = {spec.name: (spec, site) for spec, site, _ in qtrim_fx.iter_sites(qm)
               if spec.kind == "weight" and spec.param is None}
    assert set(derived) == {"0.weight", "3.weight"}
    for spec, site in derived.values():
        assert spec.folded_bn is None  # a computed weight has no parameter to fold a BatchNorm into
        assert site.observer.lo.shape == (8 if spec.name == "0.weight" else 4,)  # DDP / checkpoint shapes
    qm.eval()
    qtrim_fx.set_blend(qm, 0.0)
    assert torch.equal(qm(x), model(x))


def test_training_reaches_the_parameters_and_lowering_computes_what_was_trained() -> None:
    _, qm, x = _prepared()
    qtrim_fx.calibrate(qm, [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    qm.train()
    qm(x).square().mean().backward()
    for name in ("0.weight", "3.parametrizations.weight.original0", "3.parametrizations.weight.original1"):
        grad = qm.get_parameter(name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    qm.eval()
    lowered = qtrim_fx.lower(qm)
    assert torch.equal(lowered(x), qm(x))


def test_pruner_leaves_computed_weights_alone() -> None:
    _, qm, _ = _prepared()
    trim = qtrim_fx.QuantTrim(qm, qtrim_fx.Curriculum(), pruner=qtrim_fx.ReversePruner(p_clip=0.9))
    pruned = {id(w) for w in trim.weights()}  # what reverse pruning clips: registered weight parameters only
    assert pruned == {id(qm.get_parameter("5.weight"))}


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt", "qnn", "npu"])
def test_file_holds_integer_weight_codes(target: str, tmp_path) -> None:
    _, qm, x = _prepared(target)
    qtrim_fx.calibrate(qm, [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    path = str(tmp_path / f"derived_{target}.onnx")
    qtrim_fx.export_onnx(qm, (x,), path, target=target)  # self-check: ORT vs the lowered model
    assert [v for v in check(path, target) if v.severity == "error"] == []
    model = onnx.load(path)
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == onnx.TensorProto.INT8
