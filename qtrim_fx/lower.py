"""``qtrim_fx.lower``: a prepared model -> a frozen, deployable GraphModule for one target."""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn

from .onnx.profiles import TargetProfile, get_profile
from .passes.fold_bn import FoldBatchNormPass
from .passes.lean_relu import RestoreReluPass
from .passes.lower_sites import LowerSitesPass
from .passes.round_bias import RoundBiasPass
from .prepare import _require_prepared

__all__ = ["lower"]


def lower(model: nn.Module, target: str | TargetProfile = "onnxruntime", opset: int | None = None) -> fx.GraphModule:
    """Fold BatchNorm and freeze every site into ``quant_dequant`` for ``target``.

    The prepared model is not modified (the result is a copy in eval mode).

    Args:
        model: a prepared, calibrated or trained model.
        target: a profile name (``onnxruntime``, ``tensorrt``, ``openvino``, ``qnn``, ``npu``) or a
            :class:`~qtrim_fx.onnx.profiles.TargetProfile`.
        opset: override the profile's opset (e.g. 21 for INT4 weights).

    Returns:
        The lowered ``GraphModule``: float ops + ``quant_dequant`` calls, equal to ONNX QDQ semantics.
    """
    _require_prepared(model, "lower")
    profile = get_profile(target)
    if opset is not None:
        profile = profile.replace(opset=int(opset))
    gm = copy.deepcopy(model).eval()
    for p in (RestoreReluPass(), FoldBatchNormPass(), LowerSitesPass(profile), RoundBiasPass(profile)):
        gm = p(gm).graph_module
    return gm
