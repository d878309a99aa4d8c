"""qtrim_fx: Quant-Trim (progressive fake quantization + reverse pruning) as torch.fx passes.

Public API::

    qm = qtrim_fx.prepare(model)                      # insert observer + blend-quant sites
    trim = qtrim_fx.QuantTrim(qm, qtrim_fx.Curriculum(10, 50, 20), qtrim_fx.ReversePruner())
    trim.epoch_start(epoch)                           # sets λ_t, pins weights
    qtrim_fx.calibrate(qm, batches)                   # post-training statistics instead of training
    print(qtrim_fx.inspect(qm))                       # sites, grids, scales, clipping
    qtrim_fx.export_onnx(qm, (x,), "model.qdq.onnx", target="onnxruntime")
    qtrim_fx.verify("model.qdq.onnx", float_model, batches, backends=("onnxruntime", "openvino"))
"""

from __future__ import annotations

from .blend import BlendControl, blend_quant
from .calibrate import CollapsedRangeWarning, calibrate
from .capture import CaptureError, capture
from .checkpoint import CheckpointError
from .config import Override, QuantConfig
from .curriculum import Curriculum
from .export import export_onnx
from .inspect import InspectReport, inspect
from .lower import lower
from .nonfinite import NonFiniteWarning
from .observer import EmaQuantileObserver
from .onnx import ExportError, ProfileError, TargetProfile, WeightAxes, check, get_profile, register_profile
from .prepare import NoSitesError, is_prepared, iter_sites, prepare, set_blend
from .pruner import ReversePruner
from .quantize import dequantize, derive_qparams, fake_quantize, quantize
from .scheme import QuantScheme, SchemeError
from .site import QuantSite
from .trim import QuantTrim
from .vendors import VendorReport, VendorVariant, vendor_sweep
from .verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "BlendControl",
    "CaptureError",
    "CheckpointError",
    "CollapsedRangeWarning",
    "Curriculum",
    "EmaQuantileObserver",
    "ExportError",
    "InspectReport",
    "NoSitesError",
    "NonFiniteWarning",
    "Override",
    "ProfileError",
    "QuantConfig",
    "QuantScheme",
    "QuantSite",
    "QuantTrim",
    "ReversePruner",
    "SchemeError",
    "TargetProfile",
    "VendorReport",
    "VendorVariant",
    "VerifyReport",
    "WeightAxes",
    "blend_quant",
    "calibrate",
    "capture",
    "check",
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
