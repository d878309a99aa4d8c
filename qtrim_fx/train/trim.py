"""``QuantTrim``: drives the global blend λ_t and reverse pruning of a prepared model from a training loop.

Under ``DistributedDataParallel`` run one ``QuantTrim`` per rank on the same schedule: λ, the
thresholds τ and the pinned weights then agree on every rank (the weights and the statistics
the pruner and the sites read are identical there; ``epoch_start`` also hands every rank rank 0's
pruner state, two small broadcasts, so a state loaded on one rank only cannot split them).
``epoch_start`` is also where the host-side bookkeeping is checked, once per epoch and never per
step: NaN/Inf counters of the sites (:class:`~qtrim_fx.runtime.nonfinite.NonFiniteWarning`) and the
observers' host mirrors of their update counts (stale after DDP broadcast a rank-0-only load).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qtrim_fx.core.errors import CheckpointError
from qtrim_fx.core.scheme import SchemeError
from qtrim_fx.runtime.nonfinite import nonfinite_counts, site_counters, warn_nonfinite
from qtrim_fx.runtime.observer import is_distributed
from qtrim_fx.runtime.prepared import iter_sites, require_prepared, set_blend, unwrap
from qtrim_fx.train.curriculum import Curriculum
from qtrim_fx.train.pruner import ReversePruner

__all__ = ["QuantTrim"]


class QuantTrim:
    """Quant-Trim schedule for a prepared model.

    Call :meth:`epoch_start` at the start of each epoch (and optionally :meth:`step`
    every training step for a per-step λ). Weights are pinned (reverse pruning) at the
    curriculum's warmup epoch and every ``pruner.every`` epochs after.

    Args:
        model: a model returned by :func:`qtrim_fx.prepare` (a ``DistributedDataParallel`` wrapper
            of one is unwrapped).
        curriculum: λ_t schedule (:class:`~qtrim_fx.Curriculum`).
        pruner: :class:`~qtrim_fx.ReversePruner`, or ``None`` for progressive fake quant only.
        steps_per_epoch: enables per-step λ via :meth:`step`.
        distributed: when a ``torch.distributed`` process group is initialized, :meth:`epoch_start`
            gives every rank rank 0's pruner state (all ranks must call it); ``False``: this rank alone.
    """

    def __init__(
        self,
        model: nn.Module,
        curriculum: Curriculum,
        pruner: ReversePruner | None = None,
        steps_per_epoch: int | None = None,
        distributed: bool = True,
    ) -> None:
        model = unwrap(model)
        require_prepared(model, "QuantTrim")
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
        self.distributed = bool(distributed)
        self.epoch = -1
        self.blend = 0.0
        self.pinned_epochs: list[int] = []
        self._nonfinite = nonfinite_counts(model)

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
        self.check_nonfinite()
        self._agree_across_ranks()
        self.epoch = epoch
        lam = self._set(float(epoch))
        if self.pruner is not None and self.pruner.step(epoch, self.weights(), start=self.curriculum.warmup):
            self.pinned_epochs.append(epoch)
        return lam

    def _agree_across_ranks(self) -> None:
        """Give every rank rank 0's pruner state (τ, update count, last pin): two small broadcasts per epoch.

        Ranks that ran the same schedule hold it already (this changes nothing); one that did not
        (a QuantTrim state loaded on rank 0 only) would otherwise pin its weights to other thresholds.
        """
        if self.pruner is None or not self.distributed or not is_distributed():
            return
        weights = self.weights()
        if not weights:
            return
        p, device = self.pruner, weights[0].device
        have = len(p.thresholds) == len(weights) and all(t is not None for t in p.thresholds)
        last = -1 if p.last_pinned_epoch is None else int(p.last_pinned_epoch)
        header = torch.tensor([int(have), p.num_updates, last], dtype=torch.int64, device=device)
        dist.broadcast(header, src=0)
        have0, updates0, last0 = (int(v) for v in header.tolist())
        thresholds: list[torch.Tensor | None] = []
        if have0:
            shapes = [(w.shape[0],) if p.per_channel and w.dim() > 0 else () for w in weights]
            sizes = [math.prod(sh) for sh in shapes]
            if have:
                flat = torch.cat([t.detach().reshape(-1).to(device, torch.float32) for t in p.thresholds])  # type: ignore[union-attr]
            else:
                flat = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
            dist.broadcast(flat, src=0)
            thresholds = [t.reshape(sh).to(w.device, copy=True)
                          for t, sh, w in zip(flat.split(sizes), shapes, weights, strict=True)]
        p.thresholds, p.num_updates = thresholds, updates0
        p.last_pinned_epoch = None if last0 < 0 else last0

    def check_nonfinite(self) -> list[str]:
        """Warn (:class:`~qtrim_fx.runtime.nonfinite.NonFiniteWarning`) naming sites that saw NaN/Inf since the last check.

        Called by :meth:`epoch_start`; call it after the last epoch too. One host read, which also
        re-aligns each observer's host count of updates with its ``num_updates`` buffer: they differ
        only when the buffer was overwritten behind the observer's back (DDP broadcasting a checkpoint
        that only rank 0 loaded); the count seeds the subsampling and marks a site observed.

        Returns:
            The names of those sites.
        """
        counters = site_counters(self.model)
        for c in counters:
            if c.observer._updates != c.num_updates:
                # The observer's own load hook restores its host state from a num_updates value.
                c.observer._on_load({"num_updates": torch.tensor(c.num_updates)}, "")
        now = {c.name: c.nonfinite for c in counters}
        when = f"in epoch {self.epoch}" if self.epoch >= 0 else "before the first epoch"
        grown = warn_nonfinite(self._nonfinite, now, when, stacklevel=4)
        self._nonfinite = now
        return grown

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
        """Schedule state (epoch, λ, pinned epochs, pruner thresholds); the model's own state is separate."""
        return {
            "epoch": self.epoch,
            "blend": self.blend,
            "pinned_epochs": list(self.pinned_epochs),
            "pruner": None if self.pruner is None else self.pruner.state_dict(),
            "weights": self._weight_names(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (load the model's ``state_dict`` too, on every rank).

        The whole state (this schedule's and the pruner's) is checked before anything is assigned:
        a state that is refused leaves this ``QuantTrim``, its pruner and the model's λ as they were.

        Raises:
            CheckpointError: ``state`` is not a QuantTrim state, is corrupted, or belongs to another
                model or pruner setting (the message says which).
        """
        if not isinstance(state, dict):
            raise CheckpointError(f"not a QuantTrim state dict (got a {type(state).__name__}); pass what "
                                  "QuantTrim.state_dict() returned")
        missing = [k for k in ("epoch", "blend", "pinned_epochs", "pruner") if k not in state]
        if missing:
            raise CheckpointError(f"not a QuantTrim state dict (KeyError: {missing[0]!r}); pass what "
                                  "QuantTrim.state_dict() returned")
        epoch, blend, pinned, pruner_state = state["epoch"], state["blend"], state["pinned_epochs"], state["pruner"]
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < -1:
            raise CheckpointError(f"corrupted QuantTrim state: epoch={epoch!r} is not an int >= -1 (-1: before "
                                  "the first epoch)")
        if isinstance(blend, bool) or not isinstance(blend, numbers.Real):
            raise CheckpointError(f"corrupted QuantTrim state: blend={blend!r} is not a number in [0, 1]")
        blend = float(blend)
        if not math.isfinite(blend) or not 0.0 <= blend <= 1.0:
            raise CheckpointError(f"corrupted QuantTrim state: blend={blend} is outside [0, 1]")
        if not isinstance(pinned, (list, tuple)) or not all(
            isinstance(e, numbers.Integral) and not isinstance(e, bool) and e >= 0 for e in pinned
        ):
            raise CheckpointError(f"corrupted QuantTrim state: pinned_epochs={pinned!r} is not a list of "
                                  "non-negative ints")
        if (pruner_state is None) != (self.pruner is None):
            have = "has" if pruner_state is not None else "has no"
            raise CheckpointError(
                f"the QuantTrim state {have} ReversePruner state but this QuantTrim "
                f"{'has no' if self.pruner is None else 'has a'} pruner; construct it as the saved run was"
            )
        self._check_weights(state.get("weights"))
        if self.pruner is not None:
            self._check_thresholds(pruner_state)
            problem = self.pruner.state_problem(pruner_state)
            if problem is not None:
                raise CheckpointError(f"corrupted QuantTrim state: its pruner state does not load ({problem}); "
                                      "pass what QuantTrim.state_dict() returned")
        # Everything is checked: from here on nothing can fail half-way.
        if self.pruner is not None:
            self.pruner.load_state_dict(pruner_state)
        self.epoch, self.blend, self.pinned_epochs = int(epoch), blend, [int(e) for e in pinned]
        set_blend(self.model, blend)

    def _weight_names(self) -> list[str]:
        return [spec.param for spec, _, _ in iter_sites(self.model) if spec.kind == "weight" and spec.param]

    def _check_weights(self, saved: Any) -> None:
        if saved is None:  # states written before the names were kept
            return
        if not isinstance(saved, (list, tuple)) or not all(isinstance(n, str) for n in saved):
            raise CheckpointError(f"corrupted QuantTrim state: weights={saved!r} is not a list of parameter names")
        ours = self._weight_names()
        if list(saved) != ours:
            missing = [n for n in ours if n not in saved][:4]
            extra = [n for n in saved if n not in ours][:4]
            raise CheckpointError(
                f"the QuantTrim state was saved for weights {', '.join(map(str, saved[:4]))}"
                f"{' ...' if len(saved) > 4 else ''} but this model's are {', '.join(ours[:4])}"
                f"{' ...' if len(ours) > 4 else ''} (not in the state: {', '.join(missing) or '-'}; "
                f"not in this model: {', '.join(map(str, extra)) or '-'}); it belongs to another model or config"
            )

    def _check_thresholds(self, pruner_state: Any) -> None:
        thresholds = pruner_state.get("thresholds") if isinstance(pruner_state, dict) else None
        if not isinstance(thresholds, (list, tuple)):
            raise CheckpointError("corrupted QuantTrim state: the pruner state has no 'thresholds' list")
        weights = self.weights()
        if len(thresholds) not in (0, len(weights)):
            raise CheckpointError(
                f"QuantTrim state tracks {len(thresholds)} weights but this model has {len(weights)}; "
                "the checkpoint belongs to a different model or config"
            )
        for name, w, tau in zip(self._weight_names(), weights, thresholds, strict=False):
            if tau is None:
                continue
            if not isinstance(tau, torch.Tensor) or not bool(torch.isfinite(tau).all()) or bool((tau < 0).any()):
                raise CheckpointError(f"corrupted QuantTrim state: threshold τ of {name} is not a finite, "
                                      f"non-negative tensor ({tau!r})")
            want = (w.shape[0],) if self.pruner.per_channel and w.dim() > 0 else ()
            if tuple(tau.shape) != want:
                raise CheckpointError(
                    f"QuantTrim state has a threshold τ of shape {tuple(tau.shape)} for {name}, which needs "
                    f"{want}; the checkpoint belongs to another model or per_channel setting"
                )

    def __repr__(self) -> str:
        return f"QuantTrim(epoch={self.epoch}, λ={self.blend:.4f}, {self.curriculum}, {self.pruner})"
