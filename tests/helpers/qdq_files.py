"""Shared helpers for tests of exported QDQ files: prepare → calibrate → export, and an output's step size."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import nn

import qtrim_fx


def export_for_target(make_net: Callable[[], nn.Module], target: str, path: str | Path, x: tuple[torch.Tensor],
                      calib: list[tuple[torch.Tensor]]) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``make_net()`` (built after seeding torch with 0) prepared for ``target`` on example input ``x``, calibrated
    on ``calib``, exported at λ = 1 to ``path`` (the export's own self-check runs ONNX Runtime too). Returns the
    prepared model and ``x``."""
    torch.manual_seed(0)
    qm = qtrim_fx.prepare(make_net().eval(), x, target=target)
    qtrim_fx.calibrate(qm, calib)
    qtrim_fx.set_blend(qm, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.export_onnx(qm.eval(), x, str(path), target=target)
    return qm, x


def output_lsb(graph: onnx.GraphProto) -> float:
    """The scale of the DequantizeLinear that writes the graph's first output (one output step)."""
    dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] == graph.output[0].name)
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    values |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    return float(values[dq.input[1]])
