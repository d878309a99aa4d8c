"""``python -m qtrim_fx ...``: the ``qtrim`` command line."""

from __future__ import annotations

from qtrim_fx.tools.cli import main

raise SystemExit(main())
