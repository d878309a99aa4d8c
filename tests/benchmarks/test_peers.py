"""Smoke test of benchmarks/peers.py --quick (digits; FP32, qtrim_fx, torch.ao, ORT PTQ).

Runs in the plain dev environment: peers that are not installed are reported as such, never crash
the table. The full run (every peer, MNIST) is on demand, see RESULTS.md "## Peers".
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load():
    spec = importlib.util.spec_from_file_location("peers", BENCH / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _peers_section() -> str | None:
    results = BENCH / "RESULTS.md"
    text = results.read_text() if results.exists() else ""
    start = text.find("\n## Peers\n")
    if start < 0:
        return None
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def test_quick_peers_table_has_numbers_for_ours_fp32_and_ort_ptq(capsys):
    sys.path.insert(0, str(BENCH))
    try:
        peers = _load()
        before = _peers_section()
        out = peers.main(["--quick", "--no-write", "--tools", "fp32,qtrim_fx,ort-ptq,nncf"])
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop("peers", None)
    assert _peers_section() == before  # --no-write (other sections may change: benchmarks run concurrently)
    rows = {r.tool.key: r for r in out["rows"]}
    for key in ("fp32", "qtrim_fx", "ort-ptq"):
        row = rows[key]
        assert row.status == "ok", (key, row.stage, row.reason)
        for backend in ("onnxruntime", "openvino"):
            top1, sqnr = row.metrics[backend]
            assert 0.5 < top1 <= 1.0, (key, backend, top1)  # 10 digit classes: a working model, not chance
            assert math.isfinite(sqnr) or key == "fp32"
    # the deployed files of the quantizers are quantized, and lose a little against their own float model
    assert rows["qtrim_fx"].metrics["onnxruntime"][1] > 10.0
    assert rows["ort-ptq"].metrics["onnxruntime"][1] > 10.0
    assert rows["qtrim_fx"].metrics["violations"][0] == 0  # our own file follows the onnxruntime rules
    assert rows["qtrim_fx"].times and rows["fp32"].times  # timed in the interleaved rounds
    vendor = rows["qtrim_fx"].metrics["vendor"]
    assert isinstance(vendor, tuple) and vendor[4] == vendor[5] > 0  # every ORT recipe ran
    # a peer is either installed (and then has a row of numbers or a failed stage) or reported as not installed
    assert rows["nncf"].status in ("ok", "failed", "not installed")
    md = out["markdown"]
    assert "| qtrim_fx, QuantConfig() defaults |" in md
    if rows["nncf"].status == "not installed":
        assert "| NNCF QAT (Q/DQ export) | not installed |" in md
    assert "| tool | top-1 % ORT |" in capsys.readouterr().out
