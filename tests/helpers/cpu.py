"""What the host CPU's ONNX Runtime integer kernels compute exactly (tests that run fused kernels ask)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def u8s8_kernels_saturate() -> bool:
    """ONNX Runtime's uint8 x int8 CPU GEMM saturates here: an x86 CPU without VNNI (AVX2 / AVX-512F use
    ``vpmaddubsw``, whose int16 pair sums overflow; see ``qtrim_fx.onnx.unsigned_weights``)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # an x86 host we cannot inspect: assume the common case without VNNI
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def ort_cpu_session(model, so=None):
    """An ONNX Runtime CPU session for comparing a file's outputs with torch: ``ORT_ENABLE_ALL`` (its fused integer
    kernels, what a deployment runs) where those are exact, the QDQ semantics (``ORT_DISABLE_ALL``) on a host whose
    U8S8 GEMM saturates (:func:`u8s8_kernels_saturate`; ``tests/onnx/test_unsigned_weights.py`` covers it there)."""
    import onnxruntime as ort

    so = so or ort.SessionOptions()
    if u8s8_kernels_saturate():
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
