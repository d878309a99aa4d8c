"""Fuzzing: random small networks go prepare -> calibrate -> export_onnx -> ONNX Runtime end to end.

Hypothesis draws networks from conv / depthwise conv / conv-transpose / linear / activation /
residual add / concat / pooling / attention (hand-written SDPA or ``nn.MultiheadAttention``)
blocks with random shapes and channel counts. Each one is prepared, calibrated, set to λ = 1 and
exported for ONNX Runtime; the file passes ``onnx.checker`` (full check) and ONNX Runtime with
every graph optimization off runs it to the prepared model's output.

Tolerance. Torch and ONNX Runtime compute the float ops between the Q/DQ pairs in different
orders, so a value that lands within float rounding of a quantization midpoint can round to the
neighbouring level (a "flip"): that value moves by one step of its site, and the move propagates.
Flips are rare, so the output error has a small power: we require SQNR >= 30 dB (error power at
most 1/1000 of the output's). An output with almost no spread (a saturated sigmoid, a constant)
makes SQNR meaningless; it passes when its largest error stays within 4 steps of the output's own
grid (the output site's scale), i.e. a handful of flips. Everything else is a bug.

Budget: ``QTRIM_FUZZ_EXAMPLES`` (default 10, derandomized so the default run is repeatable; set it
for a random, longer run, e.g. ``QTRIM_FUZZ_EXAMPLES=200 python -m pytest tests/onnx/test_fuzz.py``).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import qtrim_fx

EXAMPLES = int(os.environ.get("QTRIM_FUZZ_EXAMPLES", "10"))
MIN_SQNR_DB = 30.0
MAX_OUTPUT_STEPS = 4

ACTIVATIONS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh, "hardswish": nn.Hardswish, "leaky_relu": nn.LeakyReLU, "none": nn.Identity,
}


# -- the networks -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    kind: str  # conv | residual | concat | pool | convt | linear | residual_linear | concat_linear | matmul
    width: int = 0
    kernel: int = 1
    stride: int = 1
    depthwise: bool = False
    bias: bool = True
    bn: bool = False
    act: str = "relu"
    pool: str = "avg"


@dataclass(frozen=True)
class NetSpec:
    family: str  # image | vector
    in_channels: int
    size: int  # image side, or vector length
    blocks: tuple[Block, ...]
    attention: tuple[str, int, int] | None  # (sdpa | mha, heads, head_dim) on the image's tokens
    classes: int
    seed: int
    input_scale: float = 1.0  # of the checked batch relative to the calibration data (> 1: saturation)
    weight_bits: int = 8  # 4: INT4 weights, exported at opset 21


def _randomize_bn(bn: nn.BatchNorm2d, g: torch.Generator) -> None:
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)


class _Attention(nn.Module):
    """Single attention layer on (B, T, C) tokens: hand-written q/k/v + SDPA, or nn.MultiheadAttention."""

    def __init__(self, channels: int, kind: str, heads: int, head_dim: int) -> None:
        super().__init__()
        d = heads * head_dim
        self.kind, self.heads = kind, heads
        self.proj_in = nn.Linear(channels, d)
        if kind == "mha":
            self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        else:
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = self.proj_in(t)
        if self.kind == "mha":
            a, _ = self.mha(t, t, t, need_weights=False)
            return t + a
        b, n, d = t.shape
        q, k, v = (m(t).reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return t + self.o(a)


class _ParamMatmul(nn.Module):
    """``x @ W`` with a bare parameter (a matmul weight site, per-channel along the last axis)."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, n) / math.sqrt(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight)


class FuzzNet(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(spec.seed)
        self.kinds = [b.kind for b in spec.blocks]
        self.layers = nn.ModuleList()
        self.acts = nn.ModuleList()
        c = spec.in_channels
        for b in spec.blocks:
            layer, act, c = self._make(b, c, spec.family, g)
            self.layers.append(layer)
            self.acts.append(act)
        self.attention = None if spec.attention is None else _Attention(c, *spec.attention)
        if spec.attention is not None:
            c = spec.attention[1] * spec.attention[2]
        self.head = nn.Linear(c, spec.classes)
        self.image = spec.family == "image"

    @staticmethod
    def _make(b: Block, c: int, family: str, g: torch.Generator) -> tuple[nn.Module, nn.Module, int]:
        act = ACTIVATIONS[b.act]()
        if b.kind in ("conv", "residual", "concat"):
            out = c if b.kind == "residual" or b.depthwise else b.width
            groups = c if b.depthwise else 1
            conv = nn.Conv2d(c, out, b.kernel, stride=b.stride if b.kind == "conv" else 1,
                             padding=b.kernel // 2, groups=groups, bias=b.bias)
            layer: nn.Module = conv
            if b.bn:
                bn = nn.BatchNorm2d(out)
                _randomize_bn(bn, g)
                layer = nn.Sequential(conv, bn)
            return layer, act, c + out if b.kind == "concat" else out
        if b.kind == "convt":
            return nn.ConvTranspose2d(c, b.width, 2, stride=2, bias=b.bias), act, b.width
        if b.kind == "pool":
            return (nn.AvgPool2d(2) if b.pool == "avg" else nn.MaxPool2d(2)), nn.Identity(), c
        if b.kind == "matmul":
            return _ParamMatmul(c, b.width), act, b.width
        out = c if b.kind == "residual_linear" else b.width
        return nn.Linear(c, out, bias=b.bias), act, c + out if b.kind == "concat_linear" else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, layer, act in zip(self.kinds, self.layers, self.acts, strict=True):
            if kind in ("residual", "residual_linear"):
                x = x + act(layer(x))
            elif kind in ("concat", "concat_linear"):
                x = torch.cat([x, act(layer(x))], dim=1)
            else:
                x = act(layer(x))
        if self.image:
            if self.attention is not None:
                x = self.attention(x.flatten(2).transpose(1, 2)).mean(dim=1)
            else:
                x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)


# -- strategies --------------------------------------------------------------------------------------
_acts = st.sampled_from(sorted(ACTIVATIONS))
_widths = st.integers(1, 12)


@st.composite
def _image_block(draw, side: int) -> Block:
    kinds = ["conv", "conv", "residual", "concat", "convt"] + (["pool"] if side >= 2 else [])
    kind = draw(st.sampled_from(kinds))
    return Block(
        kind=kind, width=draw(_widths), kernel=draw(st.sampled_from([1, 3])),
        stride=draw(st.sampled_from([1, 2])) if side >= 2 else 1, depthwise=draw(st.booleans()) and kind == "conv",
        bias=draw(st.booleans()), bn=draw(st.booleans()), act=draw(_acts), pool=draw(st.sampled_from(["avg", "max"])),
    )


def _side_after(b: Block, side: int) -> int:
    if b.kind == "pool":
        return side // 2
    if b.kind == "conv" and b.stride == 2:
        return (side + 2 * (b.kernel // 2) - b.kernel) // 2 + 1
    return side * 2 if b.kind == "convt" else side


@st.composite
def net_specs(draw) -> NetSpec:
    family = draw(st.sampled_from(["image", "image", "vector"]))
    seed = draw(st.integers(0, 2**16))
    classes = draw(st.integers(2, 10))
    scale = draw(st.sampled_from([1.0, 1.0, 0.5, 3.0]))
    bits = draw(st.sampled_from([8, 8, 4]))
    n = draw(st.integers(1, 4))
    if family == "vector":
        kinds = st.sampled_from(["linear", "residual_linear", "concat_linear", "matmul"])
        blocks = tuple(Block(kind=draw(kinds),
                             width=draw(_widths), bias=draw(st.booleans()), act=draw(_acts)) for _ in range(n))
        return NetSpec(family, in_channels=draw(st.integers(1, 24)), size=0, blocks=blocks, attention=None,
                       classes=classes, seed=seed, input_scale=scale,
                       weight_bits=bits)
    side = draw(st.integers(2, 10))
    s, blocks = side, []
    for _ in range(n):
        b = draw(_image_block(s))
        if b.kind == "convt" and s > 8:
            b = Block(kind="conv", width=b.width, act=b.act)
        blocks.append(b)
        s = _side_after(b, s)
    attention = None
    if draw(st.booleans()):
        attention = (draw(st.sampled_from(["sdpa", "mha"])), draw(st.integers(1, 3)), draw(st.sampled_from([2, 4, 8])))
    return NetSpec(family, in_channels=draw(st.integers(1, 4)), size=side, blocks=tuple(blocks),
                   attention=attention, classes=classes, seed=seed, input_scale=scale,
                       weight_bits=bits)


# -- the check ---------------------------------------------------------------------------------------
def _inputs(spec: NetSpec, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (4, spec.in_channels) + ((spec.size, spec.size) if spec.family == "image" else ())
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _sqnr_db(ref: np.ndarray, err: np.ndarray) -> float:
    noise = float(np.mean(err.astype(np.float64) ** 2))
    signal = float(np.mean(ref.astype(np.float64) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def _output_step(qm) -> float:
    out = [site for s, site, _ in qtrim_fx.iter_sites(qm) if s.kind == "activation" and s.role == "output"]
    if not out:
        return 0.0
    scale, _ = out[-1].qparams()
    return float(scale.max())


def check_end_to_end(spec: NetSpec, tmp_dir) -> dict[str, float]:
    """prepare -> calibrate -> export -> checker -> ORT; returns the figures, raises on a mismatch."""
    torch.manual_seed(spec.seed)
    model = FuzzNet(spec).eval()
    calib = _inputs(spec, 3, spec.seed + 1)
    (x,) = _inputs(spec, 1, spec.seed + 2)
    x = x * spec.input_scale
    with torch.no_grad():
        float_out = model(x).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, config=qtrim_fx.QuantConfig(weight_bits=spec.weight_bits))
        qtrim_fx.calibrate(qm, calib)
        qtrim_fx.set_blend(qm, 1.0)
        qm.eval()
        with torch.no_grad():
            ref = qm(x).numpy()
        path = tmp_dir / "fuzz.onnx"
        opset = 21 if spec.weight_bits == 4 else None
        proto = qtrim_fx.export_onnx(qm, (calib[0],), path, target="onnxruntime", opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == ref.shape
    err = np.abs(got - ref)
    sqnr = _sqnr_db(ref, got - ref)
    step = _output_step(qm)
    figures = {"sqnr_db": sqnr, "max_err": float(err.max()), "output_step": step,
               "quantization_sqnr_db": _sqnr_db(float_out, ref - float_out)}
    assert np.isfinite(got).all(), "ONNX Runtime produced non-finite outputs"
    assert sqnr >= MIN_SQNR_DB or float(err.max()) <= MAX_OUTPUT_STEPS * step + 1e-6, (
        f"ONNX Runtime disagrees with the prepared model: SQNR {sqnr:.1f} dB, max|err| {err.max():.3g} "
        f"(output step {step:.3g})"
    )
    return figures


@settings(max_examples=EXAMPLES, deadline=None, derandomize="QTRIM_FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], print_blob=True)
@given(spec=net_specs())
def test_random_networks_export_and_match_onnx_runtime(spec, tmp_path):
    check_end_to_end(spec, tmp_path)


@pytest.mark.parametrize("spec", [
    NetSpec("image", 3, 8, (Block("conv", 6, 3, 1, bn=True), Block("residual", kernel=3, act="gelu"),
                            Block("concat", 4, act="sigmoid"), Block("pool", pool="max")), ("mha", 2, 4), 5, 1),
    NetSpec("image", 2, 5, (Block("conv", 4, 3, 2, act="hardswish"), Block("convt", 3, bias=False),
                            Block("conv", 3, 1, depthwise=True, bn=True, act="silu")), ("sdpa", 3, 2), 3, 2),
    NetSpec("vector", 7, 0, (Block("linear", 9, act="tanh"), Block("residual_linear", act="leaky_relu"),
                             Block("concat_linear", 3, act="relu6"), Block("matmul", 5)), None, 4, 3, input_scale=3.0,
            weight_bits=4),
], ids=["conv-bn-residual-concat-pool-mha", "strided-convT-depthwise-sdpa", "mlp-residual-concat-matmul-int4"])
def test_handpicked_networks_match_onnx_runtime(spec, tmp_path):
    figures = check_end_to_end(spec, tmp_path)
    assert figures["sqnr_db"] >= MIN_SQNR_DB
    assert math.isfinite(figures["quantization_sqnr_db"])  # λ = 1 really quantizes: the check is not vacuous
