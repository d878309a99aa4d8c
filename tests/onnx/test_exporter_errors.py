"""An op the TorchScript exporter cannot write is a qtrim ExportError that names it, never a raw torch error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtrim_fx
from qtrim_fx.core.errors import ExportError
from tests.helpers.cpu import ort_cpu_session


def test_unsupported_adaptive_pool_is_a_named_export_error(tmp_path):
    # alexnet's head at a small input: AdaptiveAvgPool2d((6, 6)) on a 3x3 map (6 is not a factor of 3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(),
                          nn.Linear(16, 2)).eval()
    x = torch.randn(1, 3, 7, 7)
    qm = qtrim_fx.prepare(model, example_inputs=(x,))
    qtrim_fx.calibrate(qm, [(x,)])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"TorchScript ONNX exporter cannot write.*adaptive_avg_pool2d.*exporter='dynamo'"):
        qtrim_fx.export_onnx(qm.eval(), (x,), path, exporter="torchscript")
    assert not path.exists()


class _BatchStatsNet(nn.Module):
    """BatchNorm without running statistics: normalises by the batch's own even in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class _UnpoolNet(nn.Module):
    """max_pool2d(return_indices=True) -> max_unpool2d(output_size=x.shape[-2:]) (a U-Net/SegNet decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y, idx = F.max_pool2d(torch.relu(self.conv(x)), 2, return_indices=True, ceil_mode=True)
        return self.out(F.max_unpool2d(y, idx, 2, output_size=x.shape[-2:]))


def _calibrated(model: nn.Module, x: torch.Tensor, target: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    qm = qtrim_fx.prepare(model.eval(), (x,), target=target)
    qtrim_fx.calibrate(qm, [(x,), (torch.randn_like(x),)])
    qtrim_fx.set_blend(qm, 1.0)
    return qm.eval()


@pytest.mark.parametrize("make,shape", [(_BatchStatsNet, (2, 3, 10, 10)), (_UnpoolNet, (2, 3, 9, 9))],
                         ids=["batchnorm_without_running_stats", "max_unpool_output_size"])
def test_auto_exporter_falls_back_when_the_torchscript_exporter_fails(tmp_path, make, shape):
    """The TorchScript exporter asserts on the first (dynamic batch) and on shape checks of the second: a raw
    AssertionError / TypeError before. ``exporter="auto"`` now writes them with the dynamo exporter (the export
    self-check runs on the file); asking for TorchScript is an ExportError naming the fix."""

    x = torch.randn(*shape)
    qm = _calibrated(make(), x)
    explicit = tmp_path / "ts.onnx"
    with pytest.raises(ExportError, match=r"TorchScript ONNX exporter failed.*exporter='dynamo'"):
        qtrim_fx.export_onnx(qm, (x,), explicit, exporter="torchscript")
    assert not explicit.exists()
    path = tmp_path / "auto.onnx"
    qtrim_fx.export_onnx(qm, (x,), path)
    sess = ort_cpu_session(path)
    xs = torch.randn(3, *shape[1:])  # another batch size: still dynamic
    with torch.no_grad():
        want = qm(xs).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: xs.numpy()})[0]
    assert abs(got - want).max() <= 0.02 * abs(want).max() + 1e-6


@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_max_pool_indices_are_never_requantized_on_integer_targets(tmp_path, target):
    """RequantizeViewsPass put a Q/DQ on the (values, indices) tuple of max_pool2d_with_indices and on the
    indices: the lowered model failed ('tuple' object has no attribute 'dtype'), reported as bad inputs."""

    from qtrim_fx.passes.lower import lower
    from qtrim_fx.runtime.qdq import is_quant_dequant

    x = torch.randn(2, 3, 9, 9)
    qm = _calibrated(_UnpoolNet(), x, target)
    gm = lower(qm, target)
    pool = next(n for n in gm.graph.nodes if "max_pool2d_with_indices" in str(n.target))
    values, indices = sorted(pool.users, key=lambda n: n.args[1])
    assert not any(is_quant_dequant(u.target) for u in pool.users)
    assert any(is_quant_dequant(u.target) for u in values.users)  # the values get their exact copy
    assert not any(is_quant_dequant(u.target) for u in indices.users)
    path = tmp_path / "unpool.onnx"
    with pytest.warns(UserWarning, match=rf"prepared for {target!r} already: qtrim_fx has no integer form") as rec:
        qtrim_fx.export_onnx(qm, (x,), path, target=target)  # MaxPool's indices, max_unpool's ScatterND: float
    assert not any("prepare the model with" in str(w.message) for w in rec)
    sess = ort_cpu_session(path)
    with torch.no_grad():
        want = qm(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - want).max() <= 0.02 * abs(want).max()


def test_float64_model_is_told_to_export_in_float32(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    qm = _calibrated(model, x, "qnn")
    with pytest.raises(ExportError, match=r"float64.*model\.float\(\)"):
        qtrim_fx.export_onnx(qm, (x,), tmp_path / "d.onnx", target="qnn")


def test_a_lowering_that_fails_where_the_prepared_model_runs_is_called_a_defect():
    from qtrim_fx.onnx.export_model import _dry_run

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    x = torch.randn(2, 4)
    prepared = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2))
    prepared[1].eval()  # a frozen BatchNorm in a train-mode model keeps its own mode afterwards
    with pytest.raises(ExportError, match=r"lowered for target 'qnn' does not run.*\(RuntimeError: boom\).*defect"):
        _dry_run(Broken(), (x,), prepared, "qnn")
    assert prepared.training and not prepared[1].training
    with pytest.raises(ExportError, match=r"does not run on the example inputs.*pass inputs with the shapes"):
        _dry_run(Broken(), (x,), Broken(), "qnn")


class _TrackedInstanceNorm(nn.Module):
    """InstanceNorm2d with running statistics: the TorchScript exporter refuses it at a dynamic batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


def test_a_failed_torchscript_attempt_prints_no_ir_dump(tmp_path, capfd):
    # torch 2.14 turns ONNX logging on for every TorchScript export (it tests a function object for truth), so a
    # failure printed its whole IR graph to stderr before the auto exporter retried with dynamo.
    model = _TrackedInstanceNorm()
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    qm = _calibrated(model, x)
    before = torch._C._jit_is_onnx_log_enabled()
    torch._C._jit_set_onnx_log_enabled(True)  # as any earlier TorchScript export in the process leaves it
    try:
        with pytest.raises(ExportError, match="TorchScript ONNX exporter cannot write"):
            qtrim_fx.export_onnx(qm, (x,), tmp_path / "ts.onnx", exporter="torchscript")  # "auto" then tries dynamo
        assert torch._C._jit_is_onnx_log_enabled()  # set back as it was
    finally:
        torch._C._jit_set_onnx_log_enabled(before)
    captured = capfd.readouterr()
    assert "Torch IR graph" not in captured.out + captured.err
