"""Graph-level helper ops inserted by the passes (FX leaves: ``torch.fx.wrap``).

BatchNorm folding during training (conv -> bn pairs), as materialize emits it::

    f  = bn_fold_factor(bn.weight, bn.running_var, eps)    # γ / sqrt(var + eps), per out channel
    wq = qtrim_sites.<conv.weight>(conv.weight, f)          # FoldedWeightSite: observes and
                                                            # fake-quantizes w·f, returns Q(w·f) / f
    y  = F.conv2d(x, wq, conv.bias, ...)                     # unchanged conv (bias included)
    z  = bn(y)                                               # BN still trains with batch stats

The site observes and quantizes the *folded* weight ``w·f`` (the weight that is
deployed) and hands the conv ``Q(w·f) / f``, so in eval
``bn(conv(x, Q(w·f)/f) + b) = conv(x, Q(w·f)) + (b − mean)·f + β``, which is the
deployed folded conv (up to float rounding). At λ = 0 the site returns ``w``
untouched, so the prepared model is bit-identical to the original. Lowering
(``FoldBatchNormPass``) replaces the pattern by one conv with the folded weight
``w·f`` fed to a plain weight site and the folded bias, and drops the BN node.
"""

from __future__ import annotations

import torch
import torch.fx

__all__ = ["bn_fold_factor", "channel_shape"]


@torch.fx.wrap
def bn_fold_factor(bn_weight: torch.Tensor | None, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-channel factor γ / sqrt(var + eps) (γ = 1 for a non-affine BN)."""
    inv_std = torch.rsqrt(running_var + eps)
    return inv_std if bn_weight is None else bn_weight * inv_std


def channel_shape(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of an ``ndim``-D tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)
