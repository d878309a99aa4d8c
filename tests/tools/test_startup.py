"""Start-up: importing qtrim_fx loads no torch, and ``qtrim check`` / ``qtrim --help`` never do."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    return set(out.stdout.split())


def test_import_qtrim_fx_loads_no_torch():
    loaded = _modules_after("import qtrim_fx; qtrim_fx.__version__; qtrim_fx.QtrimError")
    assert "torch" not in loaded and "onnx" not in loaded


def test_help_loads_no_torch():
    loaded = _modules_after("from qtrim_fx.tools.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert "torch" not in loaded


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from qtrim_fx.models import get_model

    import qtrim_fx

    model, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    path = tmp_path_factory.mktemp("startup") / "m.onnx"
    qtrim_fx.export_onnx(qm, (x,), path)
    return path


def test_check_loads_no_torch(exported):
    loaded = _modules_after(f"from qtrim_fx.tools.cli import main\nassert main(['check', {str(exported)!r}]) == 0")
    assert "torch" not in loaded and "onnxruntime" not in loaded


def test_lazy_names_resolve_and_stay_bound():
    import qtrim_fx

    assert qtrim_fx.prepare is qtrim_fx.prepare and "prepare" in dir(qtrim_fx)
    from qtrim_fx.onnx import check

    assert callable(check)  # the function, not the submodule of the same name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qtrim_fx.nope  # noqa: B018
