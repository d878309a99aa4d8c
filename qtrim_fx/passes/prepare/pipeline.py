"""``prepare_passes(config)``: the named FX pipeline of :func:`qtrim_fx.prepare`, in order.

::

    captured GraphModule
      ─SplitNormActPass──────────────▶ verified BatchNorm+act modules as plain BatchNorm + child calls
      ─DecomposeGatesPass────────────▶ (target=qnn/npu) SiLU/HardSwish as gate_product(x, gate(x))
      ─DecomposeGeluPass─────────────▶ (target=npu) GELU as its primitives (Div, Erf, Add, Mul) + gelu_product
      ─DecomposeGroupNormPass────────▶ (target=qnn/npu) affine GroupNorm as group_norm(no affine) · γ + β
      ─DecomposeAttentionPass────────▶ (target=qnn/npu) scaled_dot_product_attention as matmul, scale, softmax, matmul
      ─RewireInplacePass─────────────▶ readers after y.relu_() (result discarded) read that call's node
      ─NormalizeOpsPass──────────────▶ every op tagged with its kind (conv, linear, matmul, sdpa ...)
      ─FunctionalizeWeightedModulesPass▶ weighted modules as get_attr weight -> F.conv2d / F.linear
      ─NormalizeOpsPass──────────────▶ the new functional nodes tagged too
      ─AnnotateSitesPass─────────────▶ a frozen SiteSpec per site in node.meta (decide, no edits)
      ─InsertSitesPass───────────────▶ one observer + blend-quant module per site (edit)
      ─LeanReluPass──────────────────▶ site-only ReLUs deferred to their sites (skipped at λ = 1)
      ─InPlaceSitesPass──────────────▶ sites that are the last reader of a fresh tensor may quantize it in place
      ─InsertBiasShiftPass───────────▶ quantized Conv/Linear read their bias through a BiasShift (calibrate's correction)
      ─HoistWeightsPass──────────────▶ weight sites and bias shifts first, back to back (same values, faster)
"""

from __future__ import annotations

from qtrim_fx.core.config import QuantConfig
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.passes.base import GraphPass, run_passes
from qtrim_fx.passes.prepare.annotate import AnnotateSitesPass
from qtrim_fx.passes.prepare.bias_shift import InsertBiasShiftPass
from qtrim_fx.passes.prepare.decompose_attention import DecomposeAttentionPass
from qtrim_fx.passes.prepare.decompose_gates import DecomposeGatesPass
from qtrim_fx.passes.prepare.decompose_gelu import DecomposeGeluPass
from qtrim_fx.passes.prepare.decompose_group_norm import DecomposeGroupNormPass
from qtrim_fx.passes.prepare.functionalize import FunctionalizeWeightedModulesPass
from qtrim_fx.passes.prepare.hoist_weights import HoistWeightsPass
from qtrim_fx.passes.prepare.inplace_sites import InPlaceSitesPass
from qtrim_fx.passes.prepare.lean_relu import LeanReluPass
from qtrim_fx.passes.prepare.materialize import InsertSitesPass
from qtrim_fx.passes.prepare.normalize import NormalizeOpsPass
from qtrim_fx.passes.prepare.rewire_inplace import RewireInplacePass
from qtrim_fx.passes.prepare.split_norm_act import SplitNormActPass

__all__ = ["prepare_passes", "run_passes"]


def _gated(config: QuantConfig) -> bool:
    return config.target is not None and bool(get_profile(config.target).gated_activations())


def prepare_passes(config: QuantConfig) -> list[GraphPass]:
    """The passes that turn a captured GraphModule into a prepared one for ``config``."""
    return [
        SplitNormActPass(),
        *([DecomposeGatesPass(config)] if _gated(config) else []),
        *([DecomposeGeluPass(config)] if config.target is not None and get_profile(config.target).decomposes_gelu()
          else []),
        *([DecomposeGroupNormPass(config)] if config.target is not None and get_profile(config.target).integer_only
          else []),
        *([DecomposeAttentionPass(config)] if config.target is not None
          and get_profile(config.target).integer_attention_scores else []),
        RewireInplacePass(),
        NormalizeOpsPass(),
        FunctionalizeWeightedModulesPass(),
        NormalizeOpsPass(),
        AnnotateSitesPass(config),
        InsertSitesPass(config),
        LeanReluPass(),
        InPlaceSitesPass(),
        InsertBiasShiftPass(),
        HoistWeightsPass(),
    ]
