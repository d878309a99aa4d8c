"""The one-way import rule: core → runtime → frontend → passes → train → onnx → verification → tools.

Every module of the package is parsed (top-level *and* function-level imports, relative ones
resolved). A module may import its own stage or an earlier one, never a later one, and the
module import graph has no cycle. The reference models (``qtrim_fx.models``) import nothing of
qtrim_fx; the package's top level (``qtrim_fx/__init__.py``, ``__main__``, the public facades
and deprecated aliases) may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: stage order; a sub-stage (``passes.lower``) ranks after its siblings listed before it.
STAGES = (
    "models",
    "core",
    "runtime",
    "frontend",
    "passes",
    "passes.prepare",
    "passes.lower",
    "train",
    "onnx",
    "verification",
    "tools",
)
TOP = len(STAGES)  # the package's top level: the public API and aliases


def package_modules(pkg_dir: Path, models_dir: Path | None) -> dict[str, Path]:
    """``{dotted module name: file}`` for the package and (as ``qtrim_fx.models``) the models folder."""
    mods: dict[str, Path] = {}
    for base, prefix in ((pkg_dir, "qtrim_fx"), (models_dir, "qtrim_fx.models")):
        if base is None:
            continue
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = path
    return mods


def stage_of(module: str) -> int:
    rest = module.split(".")[1:]
    best = TOP
    for rank, stage in enumerate(STAGES):
        sp = stage.split(".")
        if rest[: len(sp)] == sp:
            best = rank  # later (more specific) matches win: passes.lower over passes
    return best


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported qtrim_fx module, line) for every import statement in the file, at any depth."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("qtrim_fx") and name in known:
                found.append((name, node.lineno))
    return found


def violations(pkg_dir: Path, models_dir: Path | None = None) -> list[str]:
    """Every upward import and every import cycle among the package's modules."""
    mods = package_modules(pkg_dir, models_dir)
    known = set(mods)
    problems = []
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for target, line in imports_of(mod, path, known):
            if target == mod or mod.startswith(target + "."):
                continue  # a package's own __init__ while importing its submodule
            graph[mod].add(target)
            if stage_of(target) > stage_of(mod):
                problems.append(f"{path.relative_to(pkg_dir.parent)}:{line}: {mod} "
                                f"({STAGES[stage_of(mod)] if stage_of(mod) < TOP else 'top'}) imports {target} "
                                f"({STAGES[stage_of(target)] if stage_of(target) < TOP else 'top'}), a later stage")
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_package_imports_run_one_way_without_cycles():
    problems = violations(ROOT / "qtrim_fx", ROOT / "models")
    assert not problems, "\n".join(problems)


def _copy_tree(tmp_path: Path) -> Path:
    pkg = tmp_path / "qtrim_fx"
    for path in (ROOT / "qtrim_fx").rglob("*.py"):
        dst = pkg / path.relative_to(ROOT / "qtrim_fx")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(path.read_text())
    return pkg


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("core/fakequant.py", "from qtrim_fx.runtime.blend import blend_quant\n"),  # top level
        ("runtime/site.py", "def _late():\n    from qtrim_fx.train.checkpoint import save\n"),  # in a function
        ("passes/prepare/annotate.py", "from ..lower import plan\n"),  # relative, prepare -> lower
        ("onnx/check.py", "import qtrim_fx.tools.cli\n"),
    ],
)
def test_an_upward_import_is_caught(tmp_path, module, line):
    pkg = _copy_tree(tmp_path)
    path = pkg / module
    path.write_text(path.read_text() + "\n" + line)
    problems = violations(pkg)
    assert any(module.replace("/", ".").removesuffix(".py") in p and "later stage" in p for p in problems), problems


def test_a_cycle_within_a_stage_is_caught(tmp_path):
    pkg = _copy_tree(tmp_path)
    (pkg / "core" / "a_mod.py").write_text("from qtrim_fx.core import b_mod\n")
    (pkg / "core" / "b_mod.py").write_text("def f():\n    from qtrim_fx.core import a_mod\n")
    assert any("import cycle" in p and "qtrim_fx.core.a_mod" in p for p in violations(pkg))


def test_models_import_nothing_of_qtrim_fx(tmp_path):
    pkg = _copy_tree(tmp_path)
    models = tmp_path / "models"
    models.mkdir()
    (models / "__init__.py").write_text("from qtrim_fx.core.scheme import QuantScheme\n")
    assert any("qtrim_fx.models" in p and "later stage" in p for p in violations(pkg, models))


def test_no_module_imports_another_modules_private_name():
    mods = package_modules(ROOT / "qtrim_fx", ROOT / "models")
    found = []
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qtrim_fx") and node.module != mod:
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, "\n".join(found)
