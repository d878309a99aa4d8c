"""ONNX back end: the ``quant_dequant`` placeholder, target profiles, QDQ passes, export and checks.

::

    from qtrim_fx.onnx import check
    from qtrim_fx.onnx import export_lowered, get_profile
    model = export_lowered(lowered_gm, (x,), "model.qdq.onnx", "tensorrt")
    assert not check("model.qdq.onnx", "tensorrt")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Light (no torch), and ``check`` must be bound here: importing the submodule ``qtrim_fx.onnx.check``
# sets the package attribute ``check`` to that module, which a lazy look-up would never replace.
from qtrim_fx.core.errors import ExportError, ProfileError
from qtrim_fx.core.profiles import TargetProfile, WeightAxes, get_profile, profile_names, register_profile
from qtrim_fx.onnx.check import check
from qtrim_fx.onnx.check_rules import Violation

if TYPE_CHECKING:
    from qtrim_fx.onnx.export import export_lowered, qdq_passes, run_qdq_passes
    from qtrim_fx.runtime.qdq import is_quant_dequant, quant_dequant

#: the torch-side names, loaded on first use: ``qtrim_fx.onnx.check`` (and ``qtrim check``) never import torch.
_LAZY: dict[str, str] = {
    "export_lowered": "qtrim_fx.onnx.export",
    "is_quant_dequant": "qtrim_fx.runtime.qdq",
    "qdq_passes": "qtrim_fx.onnx.export",
    "quant_dequant": "qtrim_fx.runtime.qdq",
    "run_qdq_passes": "qtrim_fx.onnx.export",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qtrim_fx.onnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
