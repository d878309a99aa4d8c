"""Small hand-lowered models for the ONNX back-end tests.

Each model calls ``quant_dequant`` at its sites with qparams derived for a target profile
(the way ``lower`` does: ``profile.weight_scheme(op)`` / ``profile.activation_scheme()`` +
``derive_qparams``), then is traced with ``torch.fx.symbolic_trace``. Factories return
``(graph_module, example_inputs)``.
"""

from __future__ import annotations

import functools
import os
import tempfile

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from qtrim_fx.core.fakequant import derive_qparams
from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.core.scheme import QuantScheme
from qtrim_fx.core.spec import site_key
from qtrim_fx.runtime.qdq import quant_dequant


class _Lowered(nn.Module):
    """Base: ``_act``/``_weight`` either record calibration ranges or call ``quant_dequant``."""

    def __init__(self, profile: TargetProfile, weight_bits: int | None = None) -> None:
        super().__init__()
        self.profile = profile
        self.weight_bits = weight_bits
        self.calibrating = True
        self.ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.schemes: dict[str, QuantScheme] = {}

    def _site(self, x: torch.Tensor, name: str) -> torch.Tensor:
        s = self.schemes[name]
        key = site_key(name)
        scale, zp = getattr(self, f"{key}_scale"), getattr(self, f"{key}_zp")
        return quant_dequant(x, scale, zp, s.qmin, s.qmax, s.axis, s.bits, s.signed, name)

    def _act(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.calibrating:
            lo, hi = self.ranges.get(name, (x.min(), x.max()))
            self.ranges[name] = (torch.minimum(lo, x.min()), torch.maximum(hi, x.max()))
            self.schemes[name] = self.profile.activation_scheme()
            return x
        return self._site(x, name)

    def _weight(self, w: torch.Tensor, name: str, op: str) -> torch.Tensor:
        if self.calibrating:
            scheme = self.profile.weight_scheme(op, self.weight_bits)
            dims = [d for d in range(w.dim()) if scheme.axis is None or d != scheme.axis % w.dim()]
            m = w.detach().abs().amax(dim=dims)
            self.ranges[name] = (-m, m)
            self.schemes[name] = scheme
            return w
        return self._site(w, name)

    def _out(self, y: torch.Tensor, name: str) -> torch.Tensor:
        """A site on a Conv/Gemm/MatMul output, only for profiles that quantize op outputs."""
        return self._act(y, name) if self.profile.quantize_op_outputs else y

    def finish(self, *example: torch.Tensor) -> torch.fx.GraphModule:
        with torch.no_grad():
            self(*example)
        for name, (lo, hi) in self.ranges.items():
            scale, zp = derive_qparams(self.schemes[name], lo, hi)
            self.register_buffer(f"{site_key(name)}_scale", scale)
            self.register_buffer(f"{site_key(name)}_zp", zp)
        self.calibrating = False
        return torch.fx.symbolic_trace(self.eval())


class ConvNet(_Lowered):
    """input -> conv1 -> relu -> conv2 -> relu -> mean -> flatten -> fc (outputs quantized per profile)."""

    def __init__(self, profile: TargetProfile, weight_bits: int | None = None) -> None:
        super().__init__(profile, weight_bits)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(x, "input")
        y = F.conv2d(x, self._weight(self.conv1.weight, "conv1.weight", "conv"), self.conv1.bias, padding=1)
        y = self._act(F.relu(self._out(y, "conv1.out")), "relu1.out")
        y = F.conv2d(y, self._weight(self.conv2.weight, "conv2.weight", "conv"), self.conv2.bias, 2, 1)
        y = F.relu(self._out(y, "conv2.out")).mean((2, 3), keepdim=True)
        y = torch.flatten(self._act(y, "pool.out"), 1)  # a Flatten between the site and the Gemm
        return self._out(F.linear(y, self._weight(self.fc.weight, "fc.weight", "linear"), self.fc.bias), "fc.out")


class TokenMixer(_Lowered):
    """(B, T, C) input: 3-D linears (Transpose + MatMul), a weight matmul and float attention scores."""

    def __init__(self, profile: TargetProfile, weight_bits: int | None = None, dim: int = 8) -> None:
        super().__init__(profile, weight_bits)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Parameter(torch.randn(dim, dim) / dim**0.5)  # used as x @ proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(x, "input")
        qkv = F.linear(x, self._weight(self.qkv.weight, "qkv.weight", "linear"), self.qkv.bias)
        q, k, v = self._out(qkv, "qkv.out").chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # scores stay float
        y = self._act(attn @ v, "attn.out")
        y = torch.matmul(y, self._weight(self.proj, "proj.weight", "matmul"))
        return self._out(y, "proj.out")


class Upsampler(_Lowered):
    """input -> conv_transpose (weight axis from the profile) -> output."""

    def __init__(self, profile: TargetProfile, weight_bits: int | None = None) -> None:
        super().__init__(profile, weight_bits)
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(x, "input")
        w = self._weight(self.up.weight, "up.weight", "conv_transpose")
        y = F.conv_transpose2d(x, w, self.up.bias, stride=2)
        return self._out(y, "up.out")


class ActOnly(nn.Module):
    """One activation site with explicit grid: the QuantizeLinear path in isolation."""

    def __init__(self, scale: float, zp: float, qmin: int, qmax: int, bits: int, signed: bool) -> None:
        super().__init__()
        self.register_buffer("s", torch.tensor(scale))
        self.register_buffer("z", torch.tensor(zp))
        self.grid = (qmin, qmax, None, bits, signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax, axis, bits, signed = self.grid
        return quant_dequant(x, self.s, self.z, qmin, qmax, axis, bits, signed, "act.out")


def convnet(profile: TargetProfile, weight_bits: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 8, 8)
    return ConvNet(profile, weight_bits).finish(x), (x,)


def token_mixer(profile: TargetProfile, weight_bits: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(2, 5, 8)
    return TokenMixer(profile, weight_bits).finish(x), (x,)


def upsampler(profile: TargetProfile, weight_bits: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(2, 4, 3, 3)
    return Upsampler(profile, weight_bits).finish(x), (x,)


def act_only(scale: float, zp: float, qmin: int, qmax: int, bits: int = 8, signed: bool = False):
    return torch.fx.symbolic_trace(ActOnly(scale, zp, qmin, qmax, bits, signed)), (torch.randn(4, 1000) * 3,)


def run_ort(model, *inputs: torch.Tensor) -> list:
    """Run an ONNX model on ONNX Runtime CPU with all graph optimizations off (spec semantics)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs, strict=True)}
    return sess.run(None, feeds)


@functools.cache
def _export_bytes(factory, profile: TargetProfile):
    from qtrim_fx.onnx import export_lowered

    gm, args = factory(profile)
    with tempfile.TemporaryDirectory() as tmp:
        model = export_lowered(gm, args, os.path.join(tmp, "m.onnx"), profile)
    return gm, args, model.SerializeToString()


def exported(factory, profile: TargetProfile):
    """``(gm, args, model)`` for ``factory(profile)`` exported to ``profile``, cached per test session."""
    import onnx

    gm, args, data = _export_bytes(factory, profile)
    return gm, args, onnx.load_model_from_string(data)
