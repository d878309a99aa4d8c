"""Deprecated alias of :mod:`qtrim_fx.tools.plots` (moved there by the restructure by stage; removed in the next release)."""

from __future__ import annotations

import warnings

from qtrim_fx.tools.plots import *  # noqa: F403
from qtrim_fx.tools.plots import __all__  # noqa: F401

warnings.warn("qtrim_fx.plots moved to qtrim_fx.tools.plots; import it from there (the old name is removed in the next release)",
              DeprecationWarning, stacklevel=2)
