"""Smoke test of benchmarks/export_time.py: --quick exports tiny_convnet both ways and prints the table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "export_time.py"


def test_quick_mode_times_both_exporters(capsys):
    spec = importlib.util.spec_from_file_location("export_time", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("export_time", module)
    spec.loader.exec_module(module)
    assert module.main(["--quick"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| tiny_convnet"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    torchscript, dynamo = float(cells[1]), float(cells[2])
    assert torchscript > 0 and dynamo > 0 and cells[3].endswith("x")
