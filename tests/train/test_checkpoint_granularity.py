"""A checkpoint of a model prepared for ``qnn`` (whose profile makes MatMul-form Linear weights per-tensor,
decided from the example inputs' ranks) loads with or without example inputs, into the same grids."""

from __future__ import annotations

import torch
from torch import nn

import qtrim_fx


class TokenNet(nn.Module):
    """A Linear on (batch, tokens, features) -> ONNX MatMul, then a Linear head on (batch, features) -> Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)).mean(dim=1))


def _axes(qm: nn.Module) -> dict[str, int | None]:
    return {spec.name: spec.scheme.axis for spec, _, _ in qtrim_fx.iter_sites(qm) if spec.kind == "weight"}


def test_qnn_checkpoint_reloads_without_example_inputs(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    qm = qtrim_fx.prepare(TokenNet(), (x,), target="qnn")
    saved_axes = _axes(qm)
    assert saved_axes == {"fc.weight": None, "head.weight": 0}  # MatMul form per-tensor, Gemm head per-channel
    qtrim_fx.calibrate(qm, [x])
    path = tmp_path / "qm.pt"
    qtrim_fx.checkpoint.save(qm, path)
    for example in (None, (x,)):
        torch.manual_seed(1)
        loaded = qtrim_fx.checkpoint.load(TokenNet(), path, example_inputs=example)
        assert _axes(loaded) == saved_axes
        qtrim_fx.set_blend(loaded, 1.0)
        qtrim_fx.set_blend(qm, 1.0)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), qm.eval()(x))
