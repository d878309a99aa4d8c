"""What the ``qtrim`` commands share: exit codes, MODEL loading, preparation, progress and output helpers.

Only the standard library is imported at module level, so ``qtrim --help`` stays fast; torch, onnx
and the rest of qtrim_fx are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_USAGE",
    "MODEL_HELP",
    "Stages",
    "UsageError",
    "check_target",
    "default_calibration",
    "import_file",
    "load_model",
    "one_line",
    "prepared",
    "random_batches",
    "require_file",
    "require_matplotlib",
    "stage",
    "stages",
    "tty",
    "write_json",
]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_FAILURE = 0, 1, 2, 3
MODEL_HELP = "built-in name (tiny_convnet, cifar_resnet18 ...), package.module:factory or path/file.py:factory"


class UsageError(Exception):
    """A bad command line: printed as one line, exit code 2."""


# --- models and inputs ---------------------------------------------------------------------------------


def import_file(path: Path) -> Any:
    """Import a user's ``.py`` file as a module (for ``path/file.py:factory`` MODEL specs).

    Args:
        path: the Python file.

    Returns:
        The imported module.

    Raises:
        UsageError: the file cannot be loaded or raises while importing.
    """
    name = f"_qtrim_user_{path.stem}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise UsageError(f"cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))  # so the file's own sibling imports work
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"importing {str(path)!r} failed: {type(e).__name__}: {one_line(e)}") from None
    return module


def load_model(spec: str) -> tuple[Any, tuple]:
    """Resolve a MODEL spec to ``(module, example_inputs)`` (example inputs may be ``()``).

    Args:
        spec: a built-in model name, ``package.module:factory`` or ``path/file.py:factory``.

    Returns:
        ``(module, example_inputs)``.

    Raises:
        UsageError: the spec names nothing that can be built.
    """
    import torch

    if ":" not in spec:
        from qtrim_fx.models import MODELS, get_model

        if spec not in MODELS:
            raise UsageError(f"unknown model {spec!r}: use a built-in name ({', '.join(sorted(MODELS))}), "
                             "package.module:factory or path/file.py:factory")
        return get_model(spec)
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"model file {where!r} does not exist")
        module = import_file(path)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UsageError(f"cannot import {where!r}: {e}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"{where!r} has no callable {name!r}")
    try:
        out = factory()
    except Exception as e:
        raise UsageError(f"model factory {spec!r} failed: {type(e).__name__}: {one_line(e)}") from None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module):
        inputs = out[1] if isinstance(out[1], tuple) else (out[1],)
        return out[0], inputs
    if isinstance(out, torch.nn.Module):
        return out, ()
    raise UsageError(f"factory {spec!r} must return an nn.Module or (module, example_inputs)")


def random_batches(inputs: tuple, n: int, seed: int = 0) -> list[tuple]:
    """``n`` random batches shaped like ``inputs`` (floats ~ the example's mean/std; other dtypes kept).

    Args:
        inputs: the example inputs (tensors).
        n: how many batches.
        seed: seed of the generator, so every run draws the same batches.

    Returns:
        ``n`` tuples of tensors.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def like(t):
        if not t.is_floating_point():
            return t
        std = float(t.std()) if t.numel() > 1 else 1.0
        return torch.randn(t.shape, generator=gen, dtype=t.dtype) * std + float(t.mean())

    return [tuple(like(t) for t in inputs) for _ in range(n)]


def check_target(target: str) -> None:
    """Raise :class:`UsageError` (listing the known targets) unless ``target`` names a target profile."""
    from qtrim_fx.core.profiles import get_profile, profile_names

    try:
        get_profile(target)
    except Exception:
        raise UsageError(f"unknown target {target!r}; known targets: {', '.join(profile_names())}") from None


def require_file(path: str, what: str) -> None:
    """Raise :class:`UsageError` ``"{what} {path!r} does not exist"`` unless ``path`` is a file."""
    if not Path(path).is_file():
        raise UsageError(f"{what} {path!r} does not exist")


def prepared(spec: str, checkpoint: str | None, calibrate: int, progress: Any = None) -> tuple[Any, Any, tuple]:
    """Load MODEL, prepare it, load a checkpoint into it and calibrate it, as the options ask.

    Args:
        spec: the MODEL spec (see :func:`load_model`).
        checkpoint: a prepared-model ``state_dict`` file, or None.
        calibrate: number of random batches to calibrate on besides the example inputs (0: none).
        progress: the command's :class:`Stages`, or None.

    Returns:
        ``(prepared model, the float model sharing its parameters, example inputs)``.
    """
    import torch

    import qtrim_fx

    if checkpoint:
        require_file(checkpoint, "checkpoint")
    model, inputs = load_model(spec)
    stage(progress, "prepare")
    qm = qtrim_fx.prepare(model, inputs or None)
    if checkpoint:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"cannot read checkpoint {checkpoint!r}: {one_line(e)}") from None
        state = state.get("model", state) if isinstance(state, dict) else state
        try:
            qm.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise UsageError(f"checkpoint {checkpoint!r} does not fit {spec}: {one_line(e)}") from None
    if calibrate:
        if not inputs:
            raise UsageError(f"--calibrate needs example inputs; {spec} returned none")
        stage(progress, f"calibrate ({calibrate + 1} batches)")
        qtrim_fx.calibrate(qm, [inputs, *random_batches(inputs, calibrate)], progress=tty())
    return qm, model, inputs


def default_calibration(args: argparse.Namespace) -> int:
    """``--calibrate`` if given, else 0 with ``--checkpoint`` (it holds statistics) and 4 without."""
    if args.calibrate is not None:
        return args.calibrate
    return 0 if args.checkpoint else 4


# --- output helpers ------------------------------------------------------------------------------------


def one_line(e: BaseException | str, limit: int = 400) -> str:
    """``e``'s text on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tty() -> bool:
    """Whether stderr is a terminal (progress bars are shown only then)."""
    return sys.stderr.isatty()


class Stages:
    """A one-line progress display over the named stages of a command (only when stderr is a terminal)."""

    def __init__(self, title: str, total: int) -> None:
        from tqdm.auto import tqdm

        self.title, self.total, self.done = title, total, -1
        self.bar = tqdm(total=total, desc=title, disable=not tty(), leave=False, file=sys.stderr,
                        bar_format="{desc}")

    def next(self, name: str) -> None:
        """Start the stage ``name`` (the previous one counts as done)."""
        self.done += 1
        self.bar.update(1 if self.done else 0)
        self.bar.set_description_str(f"{self.title} [{min(self.done + 1, self.total)}/{self.total}] {name}")

    def close(self) -> None:
        """Remove the display."""
        self.bar.close()


@contextlib.contextmanager
def stages(title: str, total: int) -> Iterator[Stages]:
    """A :class:`Stages` display that is closed when the block ends, however it ends."""
    display = Stages(title, total)
    try:
        yield display
    finally:
        display.close()


def stage(display: Stages | None, name: str) -> None:
    """Start the stage ``name`` on ``display`` (no-op without one)."""
    if display is not None:
        display.next(name)


def require_matplotlib() -> None:
    """Raise :class:`UsageError` with the install hint when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("plots need matplotlib: pip install matplotlib")


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON (non-finite floats written as the strings "nan", "inf", "-inf")."""
    # a private name of verification/report.py, left as is until that module's owner makes it public
    from qtrim_fx.verification.report import json_safe

    Path(path).write_text(json.dumps(json_safe(data), indent=2) + "\n")
