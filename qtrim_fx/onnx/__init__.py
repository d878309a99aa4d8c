"""ONNX back end: the ``quant_dequant`` placeholder, target profiles, QDQ passes, export and checks.

::

    from qtrim_fx.onnx import check
    from qtrim_fx.onnx import export_lowered, get_profile
    model = export_lowered(lowered_gm, (x,), "model.qdq.onnx", "tensorrt")
    assert not check("model.qdq.onnx", "tensorrt")
"""

from __future__ import annotations

from qtrim_fx.core.errors import ExportError, ProfileError
from qtrim_fx.core.profiles import TargetProfile, WeightAxes, get_profile, profile_names, register_profile
from qtrim_fx.onnx.check import Violation, check
from qtrim_fx.onnx.export import export_lowered, qdq_passes, run_qdq_passes
from qtrim_fx.runtime.qdq import is_quant_dequant, quant_dequant

__all__ = [
    "ExportError",
    "ProfileError",
    "TargetProfile",
    "Violation",
    "WeightAxes",
    "check",
    "export_lowered",
    "get_profile",
    "is_quant_dequant",
    "profile_names",
    "qdq_passes",
    "quant_dequant",
    "register_profile",
    "run_qdq_passes",
]
