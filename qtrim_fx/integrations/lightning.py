"""Deprecated alias of :mod:`qtrim_fx.train.lightning` (moved there by the restructure by stage; removed in the next release)."""

from __future__ import annotations

import warnings

from qtrim_fx.train.lightning import *  # noqa: F403
from qtrim_fx.train.lightning import __all__  # noqa: F401

warnings.warn("qtrim_fx.integrations.lightning moved to qtrim_fx.train.lightning; import it from there (the old name is removed in the next release)",
              DeprecationWarning, stacklevel=2)
