"""Prepare stage: capture -> normalize -> functionalize -> annotate -> insert sites (see :mod:`.pipeline`)."""

from __future__ import annotations

from qtrim_fx.passes.prepare.api import PrepareInfo, prepare
from qtrim_fx.passes.prepare.pipeline import prepare_passes

__all__ = ["PrepareInfo", "prepare", "prepare_passes"]
