"""qtrim_fx: Quant-Trim (progressive fake quantization + reverse pruning) as torch.fx passes.

Public API::

    qm = qtrim_fx.prepare(model)                      # insert observer + blend-quant sites
    trim = qtrim_fx.QuantTrim(qm, qtrim_fx.Curriculum(10, 50, 20), qtrim_fx.ReversePruner())
    trim.epoch_start(epoch)                           # sets λ_t, pins weights
    qtrim_fx.export_onnx(qm, example_inputs, "model.qdq.onnx", target="onnxruntime")
"""

from __future__ import annotations

from .blend import BlendControl, blend_quant
from .curriculum import Curriculum
from .observer import EmaQuantileObserver
from .pruner import ReversePruner
from .quantize import dequantize, derive_qparams, fake_quantize, quantize
from .scheme import QuantScheme, SchemeError
from .site import QuantSite

__version__ = "0.1.0"

__all__ = [
    "BlendControl",
    "Curriculum",
    "EmaQuantileObserver",
    "QuantScheme",
    "QuantSite",
    "ReversePruner",
    "SchemeError",
    "blend_quant",
    "dequantize",
    "derive_qparams",
    "fake_quantize",
    "quantize",
]
