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
