"""``QuantTrim``: drives the global blend λ_t and reverse pruning of a prepared model from a training loop."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .curriculum import Curriculum
from .prepare import _require_prepared, iter_sites, set_blend
from .pruner import ReversePruner
from .scheme import SchemeError

__all__ = ["QuantTrim"]


class QuantTrim:
    """Quant-Trim schedule for a prepared model.

    Call :meth:`epoch_start` at the start of each epoch (and optionally :meth:`step`
    every training step for a per-step λ). Weights are pinned (reverse pruning) at the
    curriculum's warmup epoch and every ``pruner.every`` epochs after.

    Args:
        model: a model returned by :func:`qtrim_fx.prepare`.
        curriculum: λ_t schedule (:class:`~qtrim_fx.Curriculum`).
        pruner: :class:`~qtrim_fx.ReversePruner`, or ``None`` for progressive fake quant only.
        steps_per_epoch: enables per-step λ via :meth:`step`.
    """

    def __init__(
        self,
        model: nn.Module,
        curriculum: Curriculum,
        pruner: ReversePruner | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        _require_prepared(model, "QuantTrim")
        if not isinstance(curriculum, Curriculum):
            raise SchemeError(f"curriculum must be a qtrim_fx.Curriculum, got {type(curriculum).__name__}")
        if pruner is not None and not isinstance(pruner, ReversePruner):
            raise SchemeError(f"pruner must be a qtrim_fx.ReversePruner or None, got {type(pruner).__name__}")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise SchemeError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
        self.model = model
        self.curriculum = curriculum
        self.pruner = pruner
        self.steps_per_epoch = steps_per_epoch
        self.epoch = -1
        self.blend = 0.0
        self.pinned_epochs: list[int] = []

    def weights(self) -> list[torch.Tensor]:
        """The FP32 master weights of every weight site (what reverse pruning clips)."""
        out = []
        for spec, _site, _node in iter_sites(self.model):
            if spec.kind == "weight" and spec.param is not None:
                out.append(self.model.get_parameter(spec.param))
        return out

    def _set(self, t: float) -> float:
        self.blend = self.curriculum(t)
        set_blend(self.model, self.blend)
        return self.blend

    def epoch_start(self, epoch: int) -> float:
        """Set λ for ``epoch`` and pin weights on pinning epochs. Returns λ."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise SchemeError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch
        lam = self._set(float(epoch))
        if self.pruner is not None and self.pruner.step(epoch, self.weights(), start=self.curriculum.warmup):
            self.pinned_epochs.append(epoch)
        return lam

    def step(self, step: int) -> float:
        """Per-step λ: t = epoch + step / steps_per_epoch (call after :meth:`epoch_start`)."""
        if self.steps_per_epoch is None:
            raise SchemeError("QuantTrim.step needs steps_per_epoch=... at construction")
        if self.epoch < 0:
            raise SchemeError("call QuantTrim.epoch_start(epoch) before step()")
        return self._set(self.epoch + min(step, self.steps_per_epoch) / self.steps_per_epoch)

    @property
    def thresholds(self) -> list[torch.Tensor | None]:
        return [] if self.pruner is None else list(self.pruner.thresholds)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "blend": self.blend,
            "pinned_epochs": list(self.pinned_epochs),
            "pruner": None if self.pruner is None else self.pruner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            epoch, blend = int(state["epoch"]), float(state["blend"])
            pinned = [int(e) for e in state["pinned_epochs"]]
            pruner_state = state["pruner"]
        except (KeyError, TypeError, ValueError) as e:
            raise SchemeError(f"not a QuantTrim state dict ({e}); pass QuantTrim.state_dict()") from e
        if not math.isfinite(blend) or not 0.0 <= blend <= 1.0:
            raise SchemeError(f"corrupted QuantTrim state: blend={blend} is outside [0, 1]")
        if (pruner_state is None) != (self.pruner is None):
            raise SchemeError("QuantTrim state and this QuantTrim disagree on having a ReversePruner")
        if self.pruner is not None:
            n = len(self.weights())
            if len(pruner_state.get("thresholds", [])) not in (0, n):
                raise SchemeError(
                    f"QuantTrim state tracks {len(pruner_state['thresholds'])} weights but this model has {n}; "
                    "the checkpoint belongs to a different model or config"
                )
            self.pruner.load_state_dict(pruner_state)
        self.epoch, self.blend, self.pinned_epochs = epoch, blend, pinned
        set_blend(self.model, blend)

    def __repr__(self) -> str:
        return f"QuantTrim(epoch={self.epoch}, λ={self.blend:.4f}, {self.curriculum}, {self.pruner})"
