"""Installing qtrim_fx claims only the ``qtrim_fx`` namespace; the reference models live at ``qtrim_fx.models``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "qtrim_fx").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert "qtrim_fx.models" in listed and "models" not in listed


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_no_global_models_module(tmp_path):
    proc = _run("import models", tmp_path)
    assert proc.returncode != 0 and "No module named 'models'" in proc.stderr
    proc = _run("import qtrim_fx.models as m; print(sorted(m.MODELS)[:1])", tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_builtin_models_work_beside_a_users_models_folder(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("raise ImportError('the user models folder was imported')\n")
    proc = _run("from qtrim_fx.tools.cli import main; raise SystemExit(main(['inspect', 'tiny_mlp']))", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fc1.weight" in proc.stdout or "weight" in proc.stdout
