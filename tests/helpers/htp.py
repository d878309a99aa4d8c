"""The QNN HTP simulator (``onnxruntime-qnn``) for tests that run files on it."""

from __future__ import annotations

import importlib.util
import platform
import sys

import pytest


def require_htp() -> None:
    """The HTP simulator is part of the dev extra where it installs: missing there is a failure, not a skip."""
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        if sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail("onnxruntime-qnn is part of the dev extra on Linux x86-64: pip install -e '.[dev]'")
        pytest.skip("onnxruntime-qnn runs on Linux x86-64 and Windows arm64 only")
