"""``lower_passes(profile)``: the named FX pipeline of :func:`qtrim_fx.lower`, in order.

::

    prepared GraphModule (a deep copy, eval mode)
      ─RestoreReluPass──▶ lean ReLUs back to torch.relu
      ─FoldBatchNormPass▶ conv + BatchNorm -> one conv with folded weight and bias
      ─PlanLoweringPass─▶ a frozen LoweredSite per site for the target (decide, no edits)
      ─LowerSitesPass───▶ sites -> quant_dequant with the planned qparams, or removed (edit)
      ─RoundBiasPass────▶ biases rounded to the int32 grid the target stores them on
"""

from __future__ import annotations

from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.passes.base import GraphPass
from qtrim_fx.passes.lower.fold_bn import FoldBatchNormPass
from qtrim_fx.passes.lower.lower_sites import LowerSitesPass
from qtrim_fx.passes.lower.plan import PlanLoweringPass
from qtrim_fx.passes.lower.restore_relu import RestoreReluPass
from qtrim_fx.passes.lower.round_bias import RoundBiasPass

__all__ = ["lower_passes"]


def lower_passes(profile: TargetProfile) -> list[GraphPass]:
    """The passes that turn (a copy of) a prepared GraphModule into a deployable one for ``profile``."""
    return [
        RestoreReluPass(),
        FoldBatchNormPass(),
        PlanLoweringPass(profile),
        LowerSitesPass(),
        RoundBiasPass(profile),
    ]
