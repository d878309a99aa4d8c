"""``qtrim_fx.checkpoint``: save and load a prepared model (public namespace of :mod:`qtrim_fx.train.checkpoint`).

::

    qtrim_fx.checkpoint.save(qm, "qm.pt")
    qm = qtrim_fx.checkpoint.load(make_model(), "qm.pt")
"""

from __future__ import annotations

from qtrim_fx.train.checkpoint import CheckpointError, config_from_plain, config_to_plain, load, save

__all__ = ["CheckpointError", "config_from_plain", "config_to_plain", "load", "save"]
