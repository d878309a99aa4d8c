"""PyTorch Lightning: drive :class:`~qtrim_fx.QuantTrim` from the trainer (``pip install lightning``).

::

    from qtrim_fx.train.lightning import QuantTrimCallback

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = qtrim_fx.prepare(make_model())       # prepare in __init__, before any strategy wraps it

    cb = QuantTrimCallback(qtrim_fx.Curriculum(10, 50, 20), qtrim_fx.ReversePruner(p_clip=0.95, every=5))
    L.Trainer(max_epochs=80, callbacks=[cb]).fit(Lit(), loader)

At each training epoch start the callback calls ``QuantTrim.epoch_start(trainer.current_epoch)``
(λ_t, reverse pruning on pin epochs, NaN/Inf report); with ``per_step=True`` it also sets λ per
training batch. The QuantTrim state (epoch, λ, τ, pinned epochs) is saved in Lightning checkpoints
and restored by ``trainer.fit(..., ckpt_path=...)``; the site statistics and λ buffer are part of the
LightningModule's own ``state_dict``. Under a DDP strategy each rank runs its own callback, which is
what qtrim_fx expects (one QuantTrim per rank).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from qtrim_fx.core.scheme import SchemeError
from qtrim_fx.runtime.prepared import is_prepared
from qtrim_fx.train.curriculum import Curriculum
from qtrim_fx.train.pruner import ReversePruner
from qtrim_fx.train.trim import QuantTrim

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError(
            "qtrim_fx.integrations.lightning needs PyTorch Lightning: pip install lightning"
        ) from e

__all__ = ["QuantTrimCallback"]


class QuantTrimCallback(pl.Callback):
    """Runs a :class:`~qtrim_fx.QuantTrim` schedule from a Lightning ``Trainer``.

    Args:
        curriculum: the λ_t schedule.
        pruner: reverse pruning, or ``None``.
        per_step: set λ per training batch (t = epoch + batch / batches per epoch), not only per epoch.
        module: dotted name of the prepared model inside the LightningModule (e.g. ``"net"``);
            by default the single prepared submodule is found.

    Attributes:
        trim: the :class:`~qtrim_fx.QuantTrim` (created at ``setup``).
    """

    def __init__(
        self,
        curriculum: Curriculum,
        pruner: ReversePruner | None = None,
        per_step: bool = False,
        module: str | None = None,
    ) -> None:
        if not isinstance(curriculum, Curriculum):
            raise SchemeError(f"curriculum must be a qtrim_fx.Curriculum, got {type(curriculum).__name__}")
        self.curriculum = curriculum
        self.pruner = pruner
        self.per_step = bool(per_step)
        self.module = module
        self.trim: QuantTrim | None = None
        self._pending: dict[str, Any] | None = None

    def _prepared(self, pl_module: nn.Module) -> nn.Module:
        if self.module is not None:
            try:
                found = pl_module.get_submodule(self.module)
            except AttributeError as e:
                raise SchemeError(f"QuantTrimCallback(module={self.module!r}): {type(pl_module).__name__} has no "
                                  "such submodule") from e
            if not is_prepared(found):
                raise SchemeError(f"QuantTrimCallback(module={self.module!r}) is not a model returned by "
                                  "qtrim_fx.prepare")
            return found
        names = [n for n, m in pl_module.named_modules() if is_prepared(m)]
        if len(names) != 1:
            raise SchemeError(
                f"QuantTrimCallback found {len(names)} prepared models in {type(pl_module).__name__}"
                f"{' (' + ', '.join(names) + ')' if names else ''}; prepare the model in the LightningModule's "
                "__init__ (self.net = qtrim_fx.prepare(model)) and pass module='net' when there are several"
            )
        return pl_module.get_submodule(names[0])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.trim is None:
            self.trim = QuantTrim(self._prepared(pl_module), self.curriculum, self.pruner)
        if self._pending is not None:
            self.trim.load_state_dict(self._pending)
            self._pending = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.trim is not None
        batches = trainer.num_training_batches
        self.trim.steps_per_epoch = int(batches) if self.per_step and math.isfinite(batches) and batches > 0 else None
        self.trim.epoch_start(trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.trim is not None and self.trim.steps_per_epoch is not None:
            self.trim.step(batch_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.trim is not None:
            self.trim.check_nonfinite()  # the last epoch's NaN/Inf (epoch_start reported the earlier ones)

    def state_dict(self) -> dict[str, Any]:
        if self.trim is None:
            return dict(self._pending or {})
        return self.trim.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.trim is None:
            self._pending = dict(state_dict)
        else:
            self.trim.load_state_dict(state_dict)
