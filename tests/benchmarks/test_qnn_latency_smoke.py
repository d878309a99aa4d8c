"""Smoke test of benchmarks/qnn_latency.py: ``--quick --a16`` trains tiny_convnet briefly and runs its five files on the
HTP simulator."""

from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "qnn_latency.py"


def test_quick_a16_rows(capsys):
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        if sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail("onnxruntime-qnn is part of the dev extra on Linux x86-64: pip install -e '.[dev]'")
        pytest.skip("onnxruntime-qnn runs on Linux x86-64 and Windows arm64 only")
    spec = importlib.util.spec_from_file_location("qnn_latency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("qnn_latency", module)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--a16"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("| tiny_convnet"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[2]] = cells
    assert set(rows) == {"ort_qnn", "ort_qnn_a16", "ours_default", "ours_qnn", "ours_qnn_a16"}
    # model, data, file, ms, vs ort_qnn, vs ort_qnn_a16, float ops, SQNR vs fp32, vs lowered, ORT CPU vs lowered
    a16 = rows["ours_qnn_a16"]
    assert a16[1].startswith("digits, 200 steps")  # --quick trains the float model briefly on the digits
    assert float(a16[3]) > 0 and a16[4].endswith("x") and a16[5].endswith("x")
    median, worst = (float(v) for v in a16[8].split(" / "))
    assert a16[6] == "0" and worst <= median and median >= 30
