"""Smoke test of benchmarks/transformers_targets.py: --quick builds a 1-layer BERT, runs OpenVINO and the QNN HTP."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "transformers_targets.py"


def test_quick_mode_compiles_loads_and_compares(capsys):
    for name in ("transformers", "openvino", "onnxruntime_qnn"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (dev extra)")
    spec = importlib.util.spec_from_file_location("transformers_targets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("transformers_targets", module)
    spec.loader.exec_module(module)
    assert module.main(["--quick"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 10 and cells[0] == "bert":
            rows[cells[1]] = cells
    assert set(rows) == {"openvino", "qnn", "ort_qnn"}, rows
    assert all(r[2] == "yes" for r in rows.values()), rows  # compiles / loads with default options
    qnn = rows["qnn"]
    assert qnn[3].startswith("yes") and qnn[4] == "0"  # soc_model=60 loads; no CPU node (strict)
    assert float(qnn[6]) > 0 and float(rows["openvino"][6]) > 0  # SQNR vs the lowered model is a number
    assert float(qnn[8]) > 0 and qnn[9].endswith("x")  # HTP latency and ratio to ORT's recipe
