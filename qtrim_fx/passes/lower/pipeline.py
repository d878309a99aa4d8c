"""``lower_passes(profile)``: the named FX pipeline of :func:`qtrim_fx.lower`, in order.

::

    prepared GraphModule (a deep copy, eval mode)
      ─RequireOpsetPass─▶ every op exportable at the target's opset (sdpa: 14), else ProfileError
      ─BindScalarInputsPass▶ uses of scalar-default arguments (is_causal=False) -> the constant
      ─RestoreReluPass──▶ lean ReLUs back to torch.relu
      ─SinkWeightsPass──▶ weight sites back in front of their layers (prepare hoisted them)
      ─FoldBiasShiftPass▶ calibrate's bias corrections -> the layers' frozen biases (b − λ·δ)
      ─FoldBatchNormPass▶ conv + BatchNorm -> one conv with folded weight and bias
      ─PlanLoweringPass─▶ a frozen LoweredSite per site for the target (decide, no edits)
      ─LowerSitesPass───▶ sites -> quant_dequant with the planned qparams, or removed (edit)
      ─RequantizeViewsPass▶ (integer-only target, model prepared for one) a Q/DQ copy after each view
      ─QuantizeNormAffinePass▶ (same) LayerNorm γ on the target's 8-bit activation grid, β on the int32 grid
      ─RoundBiasPass────▶ biases rounded to the int32 grid the target stores them on
      ─MultiplyGatesPass▶ gate products of SiLU/HardSwish prepared for qnn/npu -> torch.mul
      ─SafeSoftmaxPass──▶ _safe_softmax of a quantized tensor (bool-masked / causal attention) -> softmax
      ─AttentionRank4Pass▶ 3-D scaled_dot_product_attention -> the 4-D form the exporters write (a head axis of 1)
      ─RenormEmbeddingsPass▶ embeddings with max_norm -> lookups in a table renormalized once, in full
"""

from __future__ import annotations

from qtrim_fx.core.profiles import TargetProfile
from qtrim_fx.passes.base import GraphPass
from qtrim_fx.passes.lower.attention_rank4 import AttentionRank4Pass
from qtrim_fx.passes.lower.bind_scalar_inputs import BindScalarInputsPass
from qtrim_fx.passes.lower.fold_bias_shift import FoldBiasShiftPass
from qtrim_fx.passes.lower.fold_bn import FoldBatchNormPass
from qtrim_fx.passes.lower.lower_sites import LowerSitesPass
from qtrim_fx.passes.lower.multiply_gates import MultiplyGatesPass
from qtrim_fx.passes.lower.plan import PlanLoweringPass
from qtrim_fx.passes.lower.quantize_norm_affine import QuantizeNormAffinePass
from qtrim_fx.passes.lower.renorm_embeddings import RenormEmbeddingsPass
from qtrim_fx.passes.lower.requantize_views import RequantizeViewsPass
from qtrim_fx.passes.lower.require_opset import RequireOpsetPass
from qtrim_fx.passes.lower.restore_relu import RestoreReluPass
from qtrim_fx.passes.lower.round_bias import RoundBiasPass
from qtrim_fx.passes.lower.safe_softmax import SafeSoftmaxPass
from qtrim_fx.passes.lower.sink_weights import SinkWeightsPass

__all__ = ["lower_passes"]


def lower_passes(profile: TargetProfile, prepared_for: TargetProfile | None = None) -> list[GraphPass]:
    """The passes that turn (a copy of) a prepared GraphModule into a deployable one for ``profile``.

    Args:
        profile: the target lowered for.
        prepared_for: the target the model was prepared for (``QuantConfig.target``), if any. When
            both are integer-only, views of quantized tensors are re-quantized (exact) so that the
            back end finds every op in a DQ -> op -> Q group.
    """
    integer = profile.integer_only and prepared_for is not None and prepared_for.integer_only
    return [
        RequireOpsetPass(profile),
        BindScalarInputsPass(),
        RestoreReluPass(),
        SinkWeightsPass(),
        FoldBiasShiftPass(),
        FoldBatchNormPass(),
        PlanLoweringPass(profile),
        LowerSitesPass(),
        *([RequantizeViewsPass(), QuantizeNormAffinePass(profile)] if integer else []),
        RoundBiasPass(profile),
        MultiplyGatesPass(),
        SafeSoftmaxPass(),
        AttentionRank4Pass(),
        RenormEmbeddingsPass(),
    ]
