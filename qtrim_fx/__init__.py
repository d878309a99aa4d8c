"""qtrim_fx: Quant-Trim (progressive fake quantization + reverse pruning) as torch.fx passes.

Public API::

    qm = qtrim_fx.prepare(model)                      # insert observer + blend-quant sites
    trim = qtrim_fx.QuantTrim(qm, qtrim_fx.Curriculum(10, 50, 20), qtrim_fx.ReversePruner())
    trim.epoch_start(epoch)                           # sets λ_t, pins weights
    qtrim_fx.calibrate(qm, batches)                   # post-training statistics instead of training
    print(qtrim_fx.inspect(qm))                       # sites, grids, scales, clipping
    qtrim_fx.export_onnx(qm, (x,), "model.qdq.onnx", target="onnxruntime")
    qtrim_fx.verify("model.qdq.onnx", float_model, batches, backends=("onnxruntime", "openvino"))

The package is laid out by stage of the data flow (imports run one way, left to right):
core → runtime → frontend → passes → train → onnx → verification → tools. See the README's
"Architecture" section.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers and IDEs; at run time they load on first use
    from qtrim_fx import checkpoint
    from qtrim_fx.core.config import Override, QuantConfig
    from qtrim_fx.core.errors import (
        CaptureError,
        CheckpointError,
        ConfigError,
        ExportError,
        NoSitesError,
        OutputPathError,
        ProfileError,
        QtrimError,
        SchemeError,
        VerifyError,
    )
    from qtrim_fx.core.fakequant import dequantize, derive_qparams, fake_quantize, quantize
    from qtrim_fx.core.profiles import TargetProfile, WeightAxes, get_profile, register_profile
    from qtrim_fx.core.scheme import QuantScheme
    from qtrim_fx.frontend.trace import capture
    from qtrim_fx.onnx.check import check
    from qtrim_fx.onnx.export_model import export_onnx
    from qtrim_fx.passes.lower.api import lower
    from qtrim_fx.passes.prepare.api import prepare
    from qtrim_fx.runtime.blend import BlendControl, blend_quant
    from qtrim_fx.runtime.nonfinite import NonFiniteWarning
    from qtrim_fx.runtime.observer import EmaQuantileObserver
    from qtrim_fx.runtime.prepared import is_prepared, iter_sites, set_blend
    from qtrim_fx.runtime.site import QuantSite
    from qtrim_fx.tools.inspection import InspectReport, inspect
    from qtrim_fx.train.calibrate import CollapsedRangeWarning, calibrate
    from qtrim_fx.train.curriculum import Curriculum
    from qtrim_fx.train.pruner import ReversePruner
    from qtrim_fx.train.trim import QuantTrim
    from qtrim_fx.verification.run import VerifyReport, verify
    from qtrim_fx.verification.vendors import VendorReport, VendorVariant, vendor_sweep

#: public name -> the module that defines it. Importing ``qtrim_fx`` loads none of them (no torch):
#: each loads on first use (PEP 562), so ``qtrim check`` and ``qtrim --help`` start fast.
_LAZY: dict[str, str] = {
    "BlendControl": "qtrim_fx.runtime.blend",
    "CaptureError": "qtrim_fx.core.errors",
    "CheckpointError": "qtrim_fx.core.errors",
    "CollapsedRangeWarning": "qtrim_fx.train.calibrate",
    "ConfigError": "qtrim_fx.core.errors",
    "Curriculum": "qtrim_fx.train.curriculum",
    "EmaQuantileObserver": "qtrim_fx.runtime.observer",
    "ExportError": "qtrim_fx.core.errors",
    "InspectReport": "qtrim_fx.tools.inspection",
    "NoSitesError": "qtrim_fx.core.errors",
    "NonFiniteWarning": "qtrim_fx.runtime.nonfinite",
    "OutputPathError": "qtrim_fx.core.errors",
    "Override": "qtrim_fx.core.config",
    "ProfileError": "qtrim_fx.core.errors",
    "QtrimError": "qtrim_fx.core.errors",
    "QuantConfig": "qtrim_fx.core.config",
    "QuantScheme": "qtrim_fx.core.scheme",
    "QuantSite": "qtrim_fx.runtime.site",
    "QuantTrim": "qtrim_fx.train.trim",
    "ReversePruner": "qtrim_fx.train.pruner",
    "SchemeError": "qtrim_fx.core.errors",
    "TargetProfile": "qtrim_fx.core.profiles",
    "VendorReport": "qtrim_fx.verification.vendors",
    "VendorVariant": "qtrim_fx.verification.vendors",
    "VerifyError": "qtrim_fx.core.errors",
    "VerifyReport": "qtrim_fx.verification.run",
    "WeightAxes": "qtrim_fx.core.profiles",
    "blend_quant": "qtrim_fx.runtime.blend",
    "calibrate": "qtrim_fx.train.calibrate",
    "capture": "qtrim_fx.frontend.trace",
    "check": "qtrim_fx.onnx.check",
    "checkpoint": "qtrim_fx.checkpoint",
    "dequantize": "qtrim_fx.core.fakequant",
    "derive_qparams": "qtrim_fx.core.fakequant",
    "export_onnx": "qtrim_fx.onnx.export_model",
    "fake_quantize": "qtrim_fx.core.fakequant",
    "get_profile": "qtrim_fx.core.profiles",
    "inspect": "qtrim_fx.tools.inspection",
    "is_prepared": "qtrim_fx.runtime.prepared",
    "iter_sites": "qtrim_fx.runtime.prepared",
    "lower": "qtrim_fx.passes.lower.api",
    "prepare": "qtrim_fx.passes.prepare.api",
    "quantize": "qtrim_fx.core.fakequant",
    "register_profile": "qtrim_fx.core.profiles",
    "set_blend": "qtrim_fx.runtime.prepared",
    "vendor_sweep": "qtrim_fx.verification.vendors",
    "verify": "qtrim_fx.verification.run",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qtrim_fx' has no attribute {name!r}")
    value = importlib.import_module(module)
    if name != "checkpoint":
        value = getattr(value, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "BlendControl",
    "CaptureError",
    "CheckpointError",
    "CollapsedRangeWarning",
    "ConfigError",
    "Curriculum",
    "EmaQuantileObserver",
    "ExportError",
    "InspectReport",
    "NoSitesError",
    "NonFiniteWarning",
    "OutputPathError",
    "Override",
    "ProfileError",
    "QtrimError",
    "QuantConfig",
    "QuantScheme",
    "QuantSite",
    "QuantTrim",
    "ReversePruner",
    "SchemeError",
    "TargetProfile",
    "VendorReport",
    "VendorVariant",
    "VerifyError",
    "VerifyReport",
    "WeightAxes",
    "blend_quant",
    "calibrate",
    "capture",
    "check",
    "checkpoint",
    "dequantize",
    "derive_qparams",
    "export_onnx",
    "fake_quantize",
    "get_profile",
    "inspect",
    "is_prepared",
    "iter_sites",
    "lower",
    "prepare",
    "quantize",
    "register_profile",
    "set_blend",
    "vendor_sweep",
    "verify",
]
