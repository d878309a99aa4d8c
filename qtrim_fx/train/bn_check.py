"""Do BatchNorm running statistics describe the calibration data? (used by ``calibrate``)

``calibrate`` runs the model in eval mode, so every activation range it sets is measured on tensors
normalised by BatchNorm's *running* statistics. Training normalises by *batch* statistics. When the two
agree (a trained network), the calibrated ranges fit train-mode activations; when the running variance
is stale (a network warmed for a few forwards at the default momentum still holds 0.9^k of its initial
1.0), eval-mode activations can be 10–100× narrower than train-mode ones, most train-mode values
saturate at λ > 0, and train-mode BatchNorm re-amplifies the gradient of what is left block after block
(README, "Gradients at λ > 0"). This module measures, during calibration, each eval-mode BatchNorm's
per-channel input variance and compares it with the running variance it normalises by.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["StaleBatchNorm", "StaleBatchNormWarning", "watch_batchnorm"]

#: A BatchNorm is off when the median over its channels of running / observed variance is off by more
#: than this factor either way, and the network is reported when at least :data:`STALE_SHARE` of its
#: eval-mode BatchNorms are off. Measured: trained digits / MNIST nets 0.9–1.03; the pretrained
#: torchvision MobileNetV2 on 96-px crops of natural photos 0.58–11.8, one layer of 52 beyond 4× (its
#: last expansion layer at 3×3 resolution: a distribution shift, not a stale warm-up); a random-init
#: MobileNetV2 warmed by 20 forwards at momentum 0.1: 51 of 52 layers off, up to 1.2e4×.
STALE_FACTOR = 4.0
STALE_SHARE = 0.25


class StaleBatchNormWarning(UserWarning):
    """BatchNorm running statistics that do not describe the calibration data (see :func:`watch_batchnorm`)."""


class _VarianceMeter:
    """Sum of per-channel input variances over the batches one BatchNorm sees (in eval mode)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] * x[0, 0].numel() < 2:
            return
        with torch.no_grad():
            dims = [d for d in range(x.dim()) if d != 1]
            var = x.detach().float().var(dim=dims, unbiased=False)
        if not bool(torch.isfinite(var).all()):
            return  # non-finite inputs are reported elsewhere (NonFiniteWarning)
        self.total = var if self.total is None else self.total + var
        self.count += 1


def _median_ratio(bn: nn.modules.batchnorm._BatchNorm, meter: _VarianceMeter) -> float | None:
    if meter.total is None or bn.running_var is None or meter.total.shape != bn.running_var.shape:
        return None
    observed = meter.total / meter.count
    ratio = (bn.running_var.detach().float().cpu() + bn.eps) / (observed.cpu() + bn.eps)
    return float(ratio.median())


class StaleBatchNorm:
    """What :func:`watch_batchnorm` found: call :meth:`warn` to report it (nothing when the layers were fine)."""

    def __init__(self) -> None:
        self.message: str | None = None

    def warn(self, stacklevel: int) -> None:
        if self.message is not None:
            warnings.warn(self.message, StaleBatchNormWarning, stacklevel=stacklevel + 1)


@contextlib.contextmanager
def watch_batchnorm(model: nn.Module) -> Iterator[StaleBatchNorm]:
    """Measure, in the block, whether at least :data:`STALE_SHARE` of the eval-mode BatchNorms run in it
    normalise by a running variance off from the variance of the inputs they saw by more than
    :data:`STALE_FACTOR` (channel median); the yielded :class:`StaleBatchNorm` holds the warning text
    after the block (the caller decides whether a more specific warning replaces it)."""
    found = StaleBatchNorm()
    meters: dict[str, tuple[nn.Module, _VarianceMeter]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            meter = _VarianceMeter()
            meters[name] = (m, meter)
            handles.append(m.register_forward_pre_hook(meter))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
    stale, seen = [], 0
    for name, (m, meter) in meters.items():
        r = None if m.training else _median_ratio(m, meter)  # only BatchNorms calibration ran in eval mode
        if r is None or not math.isfinite(r):
            continue
        seen += 1
        if r > STALE_FACTOR or r < 1 / STALE_FACTOR:
            stale.append((name, r))
    if not stale or len(stale) < STALE_SHARE * seen:
        return
    stale.sort(key=lambda t: -abs(math.log(t[1])))
    shown = ", ".join(f"{n} ({r:.3g}×)" for n, r in stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
    found.message = (
        f"calibrate: {len(stale)} of {seen} BatchNorm layers normalise by running variances that do not describe the "
        f"calibration data (running / observed variance, channel median: {shown}). Calibration runs in eval mode, "
        "so the activation ranges it set describe tensors that training (batch statistics) will not produce: at "
        "λ > 0 train-mode activations saturate and gradients can blow up. Calibrate a model whose BatchNorm "
        "statistics are settled (trained, or warmed with momentum=None), or skip calibrate before training and let "
        "the curriculum's λ = 0 warm-up collect the statistics in train mode."
    )
