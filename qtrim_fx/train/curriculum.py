"""The Quant-Trim curriculum: the global blend λ_t as a function of (fractional) epoch t.

    λ_t = 0                                             t < E_w           FP32 warmup
        = min(0.5, ((t − E_w) / (E_f − E_w))^4 · 0.5)   E_w ≤ t < E_f     gentle quartic ramp
        = 0.5 + min(1, (t − E_f) / H)^2 · 0.5           t ≥ E_f           quadratic to full
    then λ_t = min(λ_t, max_blend)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = ["Curriculum"]


@dataclass(frozen=True)
class Curriculum:
    """λ_t schedule of the paper (Section 3.3).

    Args:
        warmup: E_w, the epoch at which fake quantization starts (λ = 0 before).
        ramp_end: E_f > E_w, the end of the quartic ramp (λ reaches 0.5).
        horizon: H > 0, epochs from E_f until λ reaches 1.
        max_blend: α_max in (0, 1], a cap on λ (≈ 0.8 helped transformers).

    Call it with ``t`` (``epoch + step / steps_per_epoch`` for per-step schedules).
    """

    warmup: float = 10.0
    ramp_end: float = 50.0
    horizon: float = 20.0
    max_blend: float = 1.0

    def __post_init__(self) -> None:
        for name in ("warmup", "ramp_end", "horizon", "max_blend"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"Curriculum {name} must be a finite number, got {v!r}")
        if self.warmup < 0:
            raise ValueError(f"Curriculum warmup={self.warmup} must be >= 0")
        if self.ramp_end <= self.warmup:
            raise ValueError(
                f"Curriculum ramp_end={self.ramp_end} must be greater than warmup={self.warmup} "
                "(the quartic ramp runs from warmup to ramp_end)"
            )
        if self.horizon <= 0:
            raise ValueError(f"Curriculum horizon={self.horizon} must be > 0 (epochs from ramp_end to λ=1)")
        if not 0.0 < self.max_blend <= 1.0:
            raise ValueError(f"Curriculum max_blend={self.max_blend} must lie in (0, 1]")

    def __call__(self, t: float) -> float:
        t = float(t)
        if not math.isfinite(t):
            raise ValueError(f"curriculum time t must be finite, got {t}")
        ew, ef, h = float(self.warmup), float(self.ramp_end), float(self.horizon)
        if t < ew:
            lam = 0.0
        elif t < ef:
            lam = min(0.5, ((t - ew) / (ef - ew)) ** 4 * 0.5)
        else:
            lam = 0.5 + min(1.0, (t - ef) / h) ** 2 * 0.5
        return min(lam, float(self.max_blend))

    @property
    def end(self) -> float:
        """First t at which λ reaches its final value."""
        return float(self.ramp_end + self.horizon)
