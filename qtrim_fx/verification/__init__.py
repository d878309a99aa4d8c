"""Verification stage: run a QDQ file on real backends against the reference, metrics and reports,
and vendor-style re-quantization sweeps."""
