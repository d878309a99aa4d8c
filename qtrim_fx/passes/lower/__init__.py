"""Lower stage: a prepared model -> a frozen, deployable GraphModule for one target (see :mod:`.pipeline`)."""

from __future__ import annotations

from qtrim_fx.passes.lower.api import lower
from qtrim_fx.passes.lower.pipeline import lower_passes
from qtrim_fx.passes.lower.plan import lowering_plan

__all__ = ["lower", "lower_passes", "lowering_plan"]
