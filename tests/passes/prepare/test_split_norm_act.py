"""SplitNormActPass: BatchNorm subclasses that are BatchNorm followed by their own children (timm's
``BatchNormAct2d``) become a plain BatchNorm (foldable) and child calls, only when verified equal."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.core.modules import is_plain_batchnorm
from qtrim_fx.frontend.trace import capture
from qtrim_fx.passes.prepare.split_norm_act import SplitNormActPass


class NormAct(nn.BatchNorm2d):
    """BatchNorm, then its ``drop`` and ``act`` children, like timm's BatchNormAct2d."""

    def __init__(self, c: int, act: nn.Module, drop: nn.Module | None = None) -> None:
        super().__init__(c)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class ActFirst(NormAct):
    """Children registered as (drop, act) but applied act first: not the decomposition."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(super().forward(self.act(x)))


class ScaledNormAct(NormAct):
    """Extra arithmetic of its own: not the decomposition."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


def _net(norm: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.Conv2d(8, 4, 1))


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _split(model: nn.Module):
    return SplitNormActPass()(capture(model, (_x(),)).gm)


def test_structure_plain_batchnorm_then_children_sharing_tensors():
    model = _net(NormAct(8, nn.SiLU()))
    gm, modified = _split(model)
    assert modified
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "qtrim_norm.1", "1.drop", "1.act", "2"]
    plain = gm.get_submodule("qtrim_norm.1")
    assert is_plain_batchnorm(plain)
    assert plain.weight is model[1].weight and plain.running_var is model[1].running_var  # the same tensors
    assert set(gm.state_dict()) == set(model.state_dict())  # checkpoints keep the user's keys
    assert SplitNormActPass()(gm).modified is False  # idempotent


@pytest.mark.parametrize("norm", [ActFirst(8, nn.SiLU()), ScaledNormAct(8, nn.SiLU())], ids=["order", "arith"])
def test_other_forwards_stay_one_leaf(norm):
    gm, modified = _split(_net(norm))
    assert not modified
    assert [str(n.target) for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]


def test_prepared_model_is_exact_at_lambda_0_in_train_and_eval_and_updates_the_users_statistics():
    model = _net(NormAct(8, nn.Hardswish(), drop=nn.Dropout(0.2)))
    reference = copy.deepcopy(model)
    qm = qtrim_fx.prepare(model, (_x(),))
    assert any(spec.folded_bn == "qtrim_norm.1" for spec, _, _ in qtrim_fx.iter_sites(qm))
    qtrim_fx.set_blend(qm, 0.0)
    for training in (True, False):
        qm.train(training)
        reference.train(training)
        torch.manual_seed(3)
        got = qm(_x(1))
        torch.manual_seed(3)
        want = reference(_x(1))
        assert torch.equal(got, want)
    # the train-mode forward updated the user's own BatchNorm buffers, exactly as the original did
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    assert torch.equal(model[1].num_batches_tracked, reference[1].num_batches_tracked)


def test_folded_export_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _net(NormAct(8, nn.SiLU()))
    model.train()
    for i in range(3):
        model(_x(10 + i))
    model.eval()
    qm = qtrim_fx.prepare(model, (_x(),))
    qtrim_fx.calibrate(qm, [_x(20), _x(21)])
    qtrim_fx.set_blend(qm, 1.0)
    qm.eval()
    path = tmp_path / "m.onnx"
    qtrim_fx.export_onnx(qm, (_x(),), path)
    import onnx

    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "BatchNormalization" not in ops and "Sigmoid" in ops  # BN folded into the conv, SiLU kept
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = _x(5)
    with torch.no_grad():
        want = qm(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    lsb = float(abs(want).max()) * 2 / 255
    assert abs(got - want).max() <= 1.01 * lsb
