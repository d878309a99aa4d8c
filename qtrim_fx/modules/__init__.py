"""Traceable reference implementations of torch.nn modules that FX keeps opaque."""
