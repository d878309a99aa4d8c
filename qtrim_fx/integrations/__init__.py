"""Deprecated: the Lightning integration moved to :mod:`qtrim_fx.train.lightning`."""
