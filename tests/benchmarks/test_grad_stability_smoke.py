"""Smoke test of benchmarks/grad_stability.py --quick (the full run is on demand, see RESULTS.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_quick_grad_stability_prints_the_table(capsys):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("grad_stability", BENCH / "grad_stability.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        results = BENCH / "RESULTS.md"
        before = results.read_text() if results.exists() else None
        assert module.main(["--quick", "--no-write"]) == 0
    finally:
        sys.path.remove(str(BENCH))
    out = capsys.readouterr().out
    assert "| model | BN warm-up | STE | λ=0 | λ=0.2 | λ=1 | λ=1 / λ=0 |" in out
    assert "| tiny_depthwise | momentum 0.1 | identity STE |" in out
    assert "| tiny_depthwise | momentum 0.1 | clipped STE |" in out
    assert "| tiny_depthwise | train-mode stats | clipped STE |" in out
    assert (results.read_text() if results.exists() else None) == before  # --no-write
