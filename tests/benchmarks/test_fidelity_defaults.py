"""Smoke test of benchmarks/fidelity_defaults.py --quick (the full run is on demand, see RESULTS.md)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def module():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("fidelity_defaults", BENCH / "fidelity_defaults.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up by name
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("fidelity_defaults", None)
        sys.path.remove(str(BENCH))


def test_quick_run_compares_every_method_on_ort_and_never_writes(module, capsys, monkeypatch):
    def no_write(*args, **kwargs):
        raise AssertionError("--no-write must not touch benchmarks/RESULTS.md")

    monkeypatch.setattr(module, "write_section", no_write)
    assert module.main(["--quick", "--models", "digits", "--no-write"]) == 0
    out = capsys.readouterr().out
    header = ("| model | regime | qtrim defaults | qtrim paper | qtrim defaults + calibrate | ORT MinMax | "
              "ORT Percentile | ORT Entropy | best ORT | qtrim defaults − best ORT |")
    assert header in out
    rows = {r.split("|")[2].strip(): r for r in out.splitlines() if r.startswith("| digits")}
    assert set(rows) == {"PTQ", "QT (defaults run)", "QT (paper run)"}
    # Every deployed file ran on ONNX Runtime and tracks its float model (SQNR in dB, agreement in %).
    cells = re.findall(r"(-?\d+\.\d) \((\d+)\)", rows["PTQ"])
    assert len(cells) == 5  # defaults, paper, MinMax, Percentile, Entropy
    for sqnr, agree in cells:
        assert 10.0 < float(sqnr) < 80.0 and int(agree) >= 80
    assert len(re.findall(r"\d+\.\d \(\d+\)", rows["QT (defaults run)"])) == 5  # defaults, re-calibrated, 3 ORT
    assert "goal (qtrim defaults >= best ORT):" in out


def test_results_table_verdict_names_the_losing_rows(module):
    r = module.Result
    results = [r("m", "PTQ", "qtrim defaults", 30.0, 100, 1.0), r("m", "PTQ", "qtrim paper", 20.0, 100, 1.1),
               *(r("m", "PTQ", f"ORT {m}", s, 100, 1.0)
                 for m, s in zip(module.ORT_METHODS, (29.0, 31.5, 29.0), strict=True))]
    text, misses = module.table(results)
    assert "| Percentile 31.5 | -1.5 dB (defaults) |" in text
    assert misses == ["m PTQ: -1.5 dB"]
