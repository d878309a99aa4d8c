"""Fingerprint what qtrim_fx writes, so a refactor can show it changed nothing.

For each built-in model and each target this runs the CLI's own ``export`` (``--calibrate 4``) and
``inspect`` (``--calibrate 2``) in-process and records the SHA-256 of the ONNX bytes and of the
inspect table. ``--write`` stores them in ``scripts/golden_outputs.json``; ``--check`` (default)
compares a fresh run with that file and exits 1 on any difference.

The fingerprints hold for one software stack (torch, onnx, onnx-ir versions) on one kind of CPU (float kernels
differ: 2 of 30 matched on an AMD EPYC the fingerprints of an Intel Xeon, session 42): a refactor that claims
"behaviour unchanged" is checked on the stack and machine it was recorded on. Work that changes outputs on purpose
(new defaults, another exporter) re-records them with ``--write`` in the same commit.

    python scripts/golden_outputs.py --write     # before the change
    python scripts/golden_outputs.py             # after: exit 0 when every file is byte-identical
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

MODELS = ("tiny_convnet", "cifar_resnet18", "mobilenet_small", "vit_tiny", "tv_resnet18")
TARGETS = ("onnxruntime", "tensorrt", "openvino", "qnn", "npu")
GOLDEN = Path(__file__).with_name("golden_outputs.json")


def _cli(argv: list[str]) -> tuple[int, str]:
    from qtrim_fx.tools.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main(argv)
    return rc, out.getvalue()


def fingerprints(models=MODELS, targets=TARGETS) -> dict[str, str]:
    result: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            rc, table = _cli(["inspect", model, "--calibrate", "2"])
            result[f"{model}/inspect"] = f"rc={rc} " + hashlib.sha256(table.encode()).hexdigest()
            for target in targets:
                path = Path(tmp) / f"{model}.{target}.onnx"
                rc, _ = _cli(["export", model, "--calibrate", "4", "-o", str(path), "--target", target])
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"
                result[f"{model}/{target}"] = f"rc={rc} {digest}"
                print(f"{model:16s} {target:12s} {result[f'{model}/{target}']}", file=sys.stderr)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="record the fingerprints instead of checking them")
    args = ap.parse_args()
    now = fingerprints()
    if args.write:
        GOLDEN.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(now)} fingerprints to {GOLDEN}")
        return 0
    want = json.loads(GOLDEN.read_text())
    diff = sorted(k for k in want.keys() | now.keys() if want.get(k) != now.get(k))
    for k in diff:
        print(f"DIFFERS {k}: recorded {want.get(k)} now {now.get(k)}")
    print(f"{len(want) - len(diff)}/{len(want)} fingerprints identical")
    return 1 if diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
