"""Smoke test of benchmarks/vendor_variance.py --quick (the full run is on demand, see RESULTS.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_quick_vendor_variance_reports_spreads(capsys):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("vendor_variance", BENCH / "vendor_variance.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        results = BENCH / "RESULTS.md"
        before = results.read_text() if results.exists() else None
        assert module.main(["--quick", "--no-write"]) == 0
    finally:
        sys.path.remove(str(BENCH))
    out = capsys.readouterr().out
    for checkpoint in ("FP32 checkpoint", "QAT-only checkpoint", "Quant-Trim checkpoint"):
        assert f"| {checkpoint} | W8A8 |" in out
    assert "Quant-Trim spread / FP32-checkpoint spread" in out
    assert (results.read_text() if results.exists() else None) == before  # --no-write
