"""``qtrim_fx.export_onnx``: prepared model -> clean QDQ ONNX for one target (lower + export + ONNX passes)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import torch
from torch import nn

from .lower import lower
from .onnx.export import export_lowered
from .onnx.profiles import TargetProfile, get_profile

__all__ = ["export_onnx"]


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    target: str | TargetProfile = "onnxruntime",
    opset: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
) -> onnx.ModelProto:
    """Write a standard QuantizeLinear/DequantizeLinear ONNX file of a prepared model for ``target``.

    BatchNorm is folded, every site becomes Q/DQ with qparams derived from its stored statistics
    for the target's grid, weights are stored as int8/int4 initializers + DequantizeLinear, and the
    file is checked against the target's rules before it is (atomically) written.

    Args:
        model: a prepared model that has been calibrated or trained (every site has statistics).
        example_inputs: positional inputs (tuple or tensor) for tracing.
        path: output ``.onnx`` path.
        target: ``onnxruntime`` (default), ``tensorrt``, ``openvino``, ``qnn``, ``npu`` or a TargetProfile.
        opset: override the target's opset (21 for INT4 weights).
        input_names, output_names: ONNX graph input/output names.
        dynamic_batch: symbolic batch dimension on inputs and outputs.

    Returns:
        The written ``onnx.ModelProto``.
    """
    profile = get_profile(target)
    if opset is not None:
        profile = profile.replace(opset=int(opset))
    if isinstance(example_inputs, Mapping):
        raise TypeError("export_onnx takes positional example inputs (a tuple of tensors), not a dict")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    gm = lower(model, profile)
    return export_lowered(gm, args, path, profile, input_names, output_names, dynamic_batch)
