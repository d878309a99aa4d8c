"""Smoke run of benchmarks/zoo.py --quick: each row in its own process, a table, no MISMATCH rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_zoo_quick(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "zoo.py"), "--quick", "--jobs", "2", "--no-write", "--json", str(out),
         "--timeout", "400"],
        capture_output=True, text=True, timeout=900,
    )
    rows = json.loads(out.read_text())
    sys.path.insert(0, str(BENCH))
    try:
        from zoo import status
        from zoo_models import QUICK
    finally:
        sys.path.remove(str(BENCH))
    assert [r["name"] for r in rows] == list(QUICK)
    assert "| model |" in proc.stdout
    for row in rows:
        assert row.get("exact") is True, row  # λ = 0 is the float model, bit for bit
        assert row.get("train_finite") is True, row
        assert status(row) in ("ok", "QtrimError"), row  # passes, or a qtrim error names the cause
        if status(row) == "ok":
            t = row["targets"]["onnxruntime"]
            assert t["exported"] and t["check_errors"] == 0 and t["verdict"] in ("=", "noise"), row
            assert row["param_ops_quantized"] >= 1
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
