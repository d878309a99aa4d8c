"""Deprecated alias of :mod:`qtrim_fx.tools.graph_view` (moved there by the restructure by stage; removed in the next release)."""

from __future__ import annotations

import warnings

from qtrim_fx.tools.graph_view import *  # noqa: F403
from qtrim_fx.tools.graph_view import __all__  # noqa: F401

warnings.warn("qtrim_fx.graph_view moved to qtrim_fx.tools.graph_view; import it from there (the old name is removed in the next release)",
              DeprecationWarning, stacklevel=2)
