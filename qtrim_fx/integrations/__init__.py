"""Integrations with training frameworks (optional dependencies, imported on demand).

* :mod:`qtrim_fx.integrations.lightning`: ``QuantTrimCallback`` for PyTorch Lightning.
"""
