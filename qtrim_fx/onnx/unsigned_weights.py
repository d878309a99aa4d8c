"""int8 weight codes of integer kernels -> the same grid stored as uint8 around zero point 128 (``unsigned_weights``).

ONNX Runtime's CPU kernels for uint8 activations x int8 weights (QLinearConv, QGemm, MatMulIntegerToFloat,
QLinearMatMul: its ``U8S8`` GEMM) use ``vpmaddubsw`` on x86 CPUs with AVX2 or AVX-512 but no VNNI: it sums
two ``u8 · s8`` products into a saturating int16, and ``255·127 + 255·127`` does not fit. The result is
silently wrong (measured on an AMD EPYC without VNNI: a 1-layer attention 26 % of its output range off
ONNX Runtime's own unfused result, MobileNetV2-small 11 %), while the same file is exact on CPUs with
VNNI and on ARM. Stored as uint8 with zero point 128 the weights run on the ``U8U8`` kernels, which widen
to int16 before multiplying and never saturate::

    DQ(w: int8 [-127, 127], s, z = 0: int8) -> Conv      =>  DQ(w + 128: uint8 [1, 255], s, z = 128: uint8) -> Conv

``(q + 128) − 128 = q``: every weight dequantizes to the same float, so the file computes what it computed
before, bit for bit, on every runtime that follows the QDQ semantics. Only the DequantizeLinear of a
constant int8 weight with zero point 0 whose output feeds the weight input of Conv / ConvTranspose /
MatMul / Gemm only is rewritten (the ops ONNX Runtime fuses into integer GEMMs); int4 weights and anything
else stay as they are.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.onnx._graph import NameScope, add_initializer, const_array, is_op

__all__ = ["UnsignedWeightsPass", "host_u8s8_saturates"]

@functools.cache
def host_u8s8_saturates() -> bool:
    """This machine's ONNX Runtime uint8 x int8 CPU GEMM saturates: an x86 CPU without VNNI (no ``avx512_vnni``,
    ``avx_vnni`` or ``amx_int8`` flag; an x86 host whose flags cannot be read counts as one). Other machines (ARM,
    x86 with VNNI) compute int8 weights exactly."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


#: op -> the input index of its weight
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def _feeds_weights_only(value: ir.Value) -> bool:
    uses = value.uses()
    return bool(uses) and not value.is_graph_output() and all(
        is_op(u, *_WEIGHT_INPUT) and i == _WEIGHT_INPUT[u.op_type] for u, i in uses)


class UnsignedWeightsPass(ir.passes.InPlacePass):
    """``DQ(int8 w, s, 0) -> Conv/MatMul/Gemm``  =>  ``DQ(uint8 w + 128, s, 128)`` (see module doc)."""

    def __init__(self, profile: TargetProfile) -> None:
        super().__init__()
        self.profile = profile

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.profile.unsigned_weights:
            return ir.passes.PassResult(model, False)
        graph = model.graph
        names = NameScope(graph)
        modified = False
        for node in list(graph):
            if not is_op(node, "DequantizeLinear") or len(node.inputs) < 2 or node.inputs[0] is None:
                continue
            codes_value = node.inputs[0]
            if codes_value.dtype != ir.DataType.INT8 or not _feeds_weights_only(node.outputs[0]):
                continue
            codes, scale = const_array(codes_value), const_array(node.inputs[1])
            zp_value = node.inputs[2] if len(node.inputs) > 2 else None
            zero = np.zeros(np.shape(scale), np.int8) if zp_value is None else const_array(zp_value)
            if codes is None or scale is None or zero is None or np.any(zero != 0):
                continue
            base = (codes_value.name or "weight").removesuffix("_quantized")
            q = add_initializer(graph, names.value(f"{base}_quantized_u8"),
                                (codes.astype(np.int16) + 128).astype(np.uint8))
            z = add_initializer(graph, names.value(f"{base}_zero_point_u8"), np.full(np.shape(zero), 128, np.uint8))
            node.replace_input_with(0, q)
            if zp_value is None:
                node.resize_inputs(3)
            node.replace_input_with(2, z)
            modified = True
        return ir.passes.PassResult(model, modified)
