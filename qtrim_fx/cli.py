"""Deprecated alias of :mod:`qtrim_fx.tools.cli` (moved there by the restructure by stage; removed in the next release)."""

from __future__ import annotations

import warnings

from qtrim_fx.tools.cli import *  # noqa: F403
from qtrim_fx.tools.cli import __all__, main  # noqa: F401

warnings.warn("qtrim_fx.cli moved to qtrim_fx.tools.cli; import it from there (the old name is removed in the next release)",
              DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    raise SystemExit(main())
