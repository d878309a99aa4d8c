"""``qtrim_fx.lower``: a prepared model -> a frozen, deployable GraphModule for one target."""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn

from qtrim_fx.core.profiles import TargetProfile, get_profile
from qtrim_fx.passes.base import run_passes
from qtrim_fx.passes.lower.pipeline import lower_passes
from qtrim_fx.passes.lower.require_opset import default_opset
from qtrim_fx.runtime.prepared import INFO_ATTR, require_prepared, unwrap

__all__ = ["LOWERED_FROM", "lower"]

#: ``GraphModule.meta`` key of a lowered model: the prepared model's ``PrepareInfo`` (not the prepared marker itself,
#: so a lowered model is not mistaken for a prepared one)
LOWERED_FROM = "qtrim_lowered_from"


def lower(model: nn.Module, target: str | TargetProfile = "onnxruntime", opset: int | None = None) -> fx.GraphModule:
    """Fold BatchNorm and freeze every site into ``quant_dequant`` for ``target``.

    The prepared model is not modified (the result is a copy in eval mode).

    Args:
        model: a prepared, calibrated or trained model.
        target: a profile name (``onnxruntime``, ``tensorrt``, ``openvino``, ``qnn``, ``npu``) or a
            :class:`~qtrim_fx.core.profiles.TargetProfile`.
        opset: the ONNX opset lowered for; None: the one ``export_onnx`` picks (the profile's, raised to the
            oldest that writes the model as trained: INT4 weights 21, attention 14, LayerNorm on an
            integer-only target 17).

    Returns:
        The lowered ``GraphModule``: float ops + ``quant_dequant`` calls, equal to ONNX QDQ semantics.
    """
    require_prepared(model, "lower")
    profile = get_profile(target)
    if opset is not None:
        profile = profile.replace(opset=int(opset))
    else:
        profile = default_opset(unwrap(model), profile)
    info = getattr(unwrap(model), INFO_ATTR, None)
    prepared_for = getattr(getattr(info, "config", None), "target", None)
    gm = copy.deepcopy(model).eval()
    out = run_passes(gm, lower_passes(profile, get_profile(prepared_for) if prepared_for else None))
    out.meta[LOWERED_FROM] = info  # how the model was prepared (target, leaves), for export's messages
    return out
