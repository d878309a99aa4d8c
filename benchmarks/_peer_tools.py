"""Adapters of benchmarks/peers.py: one per quantization tool (prepare for QAT, export ONNX, recover float).

Each adapter takes the shared trained float model and returns the tool's trainable model; ``export``
writes the tool's deployable QDQ ONNX file (run on ONNX Runtime and OpenVINO); ``float_model`` gives the
tool's float-equivalent checkpoint (its trained weights without quantizers) for vendor re-quantization,
or ``None`` where the tool's parameters cannot be mapped back. Every call may raise: peers.py turns an
exception into the row's failed stage and one-line reason.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import qtrim_fx

os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")  # no JIT C++ build of NNCF's extension

DYN = {"x": {0: "batch"}, "y": {0: "batch"}}
IO = {"input_names": ["x"], "output_names": ["y"]}


@dataclass(frozen=True)
class Tool:
    key: str
    label: str
    requires: tuple[str, ...]  # importable modules; absent -> "not installed" row
    qat: bool  # trained in the interleaved QAT phase
    prepare: Callable[[nn.Module, list[torch.Tensor]], nn.Module] | None
    export: Callable[[nn.Module, torch.Tensor, Path], None] | None
    to_eval: Callable[[nn.Module], nn.Module] = lambda m: m.eval()
    to_train: Callable[[nn.Module], nn.Module] = lambda m: m.train()

    def installed(self) -> bool:
        return all(importlib.util.find_spec(r) is not None for r in self.requires)


def legacy_export(model: nn.Module, x: torch.Tensor, path: Path, opset: int = 17) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, dynamic_axes=DYN, **IO)


# -- FP32 ------------------------------------------------------------------------------------------------


def _fp32_prepare(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    return copy.deepcopy(model)


# -- qtrim_fx --------------------------------------------------------------------------------------------


def _qtrim_prepare(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    return qtrim_fx.prepare(copy.deepcopy(model))  # QuantConfig() defaults; λ schedule set by peers.py


def _qtrim_export(qm: nn.Module, x: torch.Tensor, path: Path) -> None:
    qtrim_fx.set_blend(qm, 1.0)
    qtrim_fx.export_onnx(qm, (x,), path, "onnxruntime")
    qtrim_fx.export_onnx(qm, (x,), path.with_suffix(".openvino.onnx"), "openvino")


# -- torch.ao FX QAT ---------------------------------------------------------------------------------------


def _ao_prepare(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (calib[0],))


class _FrozenFQ(nn.Module):
    """A torch.ao FakeQuantize with its learned qparams frozen: ``torch.fake_quantize_*`` (exports to Q/DQ)."""

    def __init__(self, fq: nn.Module) -> None:
        super().__init__()
        scale, zp = fq.calculate_qparams()
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", zp.int())
        self.qmin, self.qmax, self.axis = int(fq.quant_min), int(fq.quant_max), None
        if fq.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
            self.axis = int(fq.ch_axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, float(self.scale), int(self.zero_point), self.qmin,
                                                         self.qmax)
        return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis, self.qmin,
                                                      self.qmax)


class _FoldedQConv(nn.Module):
    """A torch.ao QAT conv (+BN, +ReLU) as deployed: BN folded (``to_float``), frozen weight fake quant."""

    def __init__(self, qat: nn.Module) -> None:
        super().__init__()
        f = qat.to_float() if hasattr(qat, "to_float") else qat  # qat.Linear: no BN to fold
        self.conv = f[0] if isinstance(f, nn.Sequential) else f
        self.act = f[1] if isinstance(f, nn.Sequential) and len(f) > 1 else nn.Identity()
        self.wfq = _FrozenFQ(qat.weight_fake_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        w = self.wfq(c.weight)
        if isinstance(c, nn.Linear):
            return self.act(nn.functional.linear(x, w, c.bias))
        return self.act(nn.functional.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups))


def _ao_export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    """Prepared FX QAT models do not export (fused observers; the reference model's quantize/dequantize ops
    and qscheme state fail both exporters), so every FakeQuantize is frozen to ``torch.fake_quantize_*``
    and every QAT conv is BN-folded: the graph ``convert_to_reference_fx`` would give."""
    from torch.ao.quantization import FakeQuantizeBase

    m = copy.deepcopy(model).eval()
    done: list[str] = []
    for name, mod in list(m.named_modules(remove_duplicate=False)):
        if not name or any(name.startswith(d + ".") for d in done):
            continue
        parent, _, leaf = name.rpartition(".")
        owner = m.get_submodule(parent) if parent else m
        if hasattr(mod, "weight_fake_quant"):
            setattr(owner, leaf, _FoldedQConv(mod))
            done.append(name)
        elif isinstance(mod, FakeQuantizeBase) and "weight_fake_quant" not in name:
            setattr(owner, leaf, _FrozenFQ(mod))
    legacy_export(m, x, path, opset=13)


# -- torchao PT2E QAT ------------------------------------------------------------------------------------


def _pt2e_prepare(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    batch = torch.export.Dim("batch", min=1, max=4096)
    gm = torch.export.export(copy.deepcopy(model).train(), (calib[0],), dynamic_shapes=({0: batch},)).module()
    return prepare_qat_pt2e(gm, quantizer)


def _pt2e_eval(m: nn.Module) -> nn.Module:
    from torchao.quantization.pt2e import move_exported_model_to_eval

    return move_exported_model_to_eval(m)


def _pt2e_train(m: nn.Module) -> nn.Module:
    from torchao.quantization.pt2e import move_exported_model_to_train

    return move_exported_model_to_train(m)


def _pt2e_export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    converted = convert_pt2e(copy.deepcopy(model))
    _pt2e_eval(converted)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(converted, (x,), str(path), dynamo=True, dynamic_shapes=({0: batch},), **IO)


# -- NNCF --------------------------------------------------------------------------------------------------


def _nncf_prepare(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    import nncf

    m = copy.deepcopy(model).eval()
    q = nncf.quantize(m, nncf.Dataset(calib), subset_size=sum(len(c) for c in calib))
    return q.train()


def _nncf_export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    from nncf.torch.quantization.layers import QuantizerExportMode

    m = copy.deepcopy(model).eval()
    n = 0
    for mod in m.modules():
        if hasattr(mod, "set_export_mode"):
            mod.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
            n += 1
    if n == 0:
        raise RuntimeError("no NNCF quantizer found to switch to Q/DQ export mode")
    legacy_export(m, x, path, opset=13)


# -- Brevitas ------------------------------------------------------------------------------------------------


def _brevitas_prepare(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    import torch.fx._symbolic_trace as st

    if not hasattr(st, "_is_fx_tracing_flag"):  # removed in torch 2.14; brevitas 0.13 imports it
        st._is_fx_tracing_flag = False
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.graph.quantize import quantize

    gm = torch.fx.symbolic_trace(copy.deepcopy(model).eval())
    q = quantize(gm)
    with torch.no_grad(), calibration_mode(q):
        for c in calib:
            q(c)
    return q.train()


def _brevitas_export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    from brevitas.export import export_onnx_qcdq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx_qcdq(model.eval(), args=x, export_path=str(path), opset_version=13, dynamic_axes=DYN, **IO)


# -- ModelOpt --------------------------------------------------------------------------------------------


def _modelopt_prepare(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    import modelopt.torch.quantization as mtq

    m = copy.deepcopy(model).eval()

    def loop(mm: nn.Module) -> None:
        for c in calib:
            mm(c)

    return mtq.quantize(m, mtq.INT8_DEFAULT_CFG, loop).train()


def _modelopt_export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    legacy_export(model.eval(), x, path, opset=17)


TOOLS = {t.key: t for t in (
    Tool("fp32", "FP32 (no quantization)", (), True, _fp32_prepare, lambda m, x, p: legacy_export(m.eval(), x, p)),
    Tool("qtrim_fx", "qtrim_fx, QuantConfig() defaults", (), True, _qtrim_prepare, _qtrim_export),
    Tool("torch.ao", "torch.ao FX QAT (x86 qconfig)", (), True, _ao_prepare, _ao_export),
    Tool("pt2e", "torchao PT2E QAT (X86InductorQuantizer)", ("torchao",), True, _pt2e_prepare, _pt2e_export,
         _pt2e_eval, _pt2e_train),
    Tool("nncf", "NNCF QAT (Q/DQ export)", ("nncf",), True, _nncf_prepare, _nncf_export),
    Tool("brevitas", "Brevitas graph quantize (QCDQ export)", ("brevitas", "onnxoptimizer"), True,
         _brevitas_prepare, _brevitas_export),
    Tool("modelopt", "ModelOpt INT8_DEFAULT_CFG QAT", ("modelopt",), True, _modelopt_prepare, _modelopt_export),
    Tool("ort-ptq", "ORT PTQ (quantize_static MinMax, per-channel QDQ)", ("onnxruntime",), False, None, None),
)}


def ort_ptq(fp32_onnx: Path, out: Path, calib: list[torch.Tensor]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    class Reader:
        def __init__(self) -> None:
            self._it = iter([{"x": c.numpy()} for c in calib])

        def get_next(self) -> dict | None:
            return next(self._it, None)

    quantize_static(str(fp32_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax)


def float_model(tool: Tool, trained: nn.Module, template: nn.Module) -> tuple[nn.Module | None, str]:
    """The tool's trained float weights loaded into a copy of ``template`` (None, reason if unmappable)."""
    if tool.key in ("fp32", "ort-ptq"):
        return trained, ""
    if tool.key == "qtrim_fx":
        return trained, ""  # a prepared model: vendor_sweep exports it at λ = 0
    src = {k: v for k, v in trained.state_dict().items() if isinstance(v, torch.Tensor)}
    flat = {k.replace(".", "_"): v for k, v in src.items()}
    out, missing = {}, []
    for k, ref in template.state_dict().items():
        cands = [k, re.sub(r"\.(\d+)\.(\w+)$", lambda mm: f".{int(mm.group(1)) - 1}.bn.{mm.group(2)}", k)]
        cands += [c.replace(".", "_") for c in cands]
        hit = next((v for c in cands for v in (src.get(c), flat.get(c)) if v is not None and v.shape == ref.shape),
                   None)
        if hit is None:
            hit = next((v for s, v in src.items() if s.endswith("." + k) and v.shape == ref.shape), None)
        if hit is None:
            missing.append(k)
        else:
            out[k] = hit.detach().clone()
    if missing:
        return None, f"{len(missing)}/{len(out) + len(missing)} float tensors not found (e.g. {missing[0]})"
    m = copy.deepcopy(template)
    m.load_state_dict(out)
    return m.eval(), ""
