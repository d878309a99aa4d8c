"""What the host CPU's ONNX Runtime integer kernels compute exactly (tests that run fused kernels ask)."""

from __future__ import annotations

from qtrim_fx.onnx.unsigned_weights import host_u8s8_saturates


def u8s8_kernels_saturate() -> bool:
    """ONNX Runtime's uint8 x int8 CPU GEMM saturates here (x86 without VNNI; see ``qtrim_fx.onnx.unsigned_weights``)."""
    return host_u8s8_saturates()


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


def sqnr_db(ref, out) -> float:
    """10·log10(Σref² / Σ(ref − out)²) in float64 (inf for identical arrays)."""
    import numpy as np

    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    noise = float(((ref - out) ** 2).sum())
    return float("inf") if noise == 0 else float(10 * np.log10((ref ** 2).sum() / noise))


def for_this_cpu(target):
    """``target``'s profile, with its int8 weight grid stored as uint8 (``unsigned_weights``) on a host whose u8 x s8
    kernels saturate, so the runtimes compute the file exactly here too: ONNX Runtime on its U8U8 integer kernels,
    OpenVINO by decompressing uint8 weights to float (its int8 kernels on int8 weights are off on such a CPU: measured
    on an AMD EPYC without VNNI, 15.4 dB vs the lowered model, 142.7 dB with uint8 weights)."""
    from qtrim_fx.core.profiles import get_profile

    prof = get_profile(target)
    return prof.replace(unsigned_weights=True) if u8s8_kernels_saturate() else prof
