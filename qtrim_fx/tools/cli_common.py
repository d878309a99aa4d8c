"""What the ``qtrim`` commands share: exit codes, MODEL loading, preparation, progress and output helpers.

The checks of input and output paths and the reading of ``--checkpoint`` files are in
:mod:`qtrim_fx.tools.cli_inputs` (re-exported here).

Only the standard library is imported at module level, so ``qtrim --help`` stays fast; torch, onnx
and the rest of qtrim_fx are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qtrim_fx.tools.cli_inputs import (
    UsageError,
    read_checkpoint,
    require_file,
    require_output,
    require_output_folder,
)
from qtrim_fx.tools.cli_streams import real_stderr, tty, warn
from qtrim_fx.tools.sanitize import one_line, printable

__all__ = [
    "CHECKPOINT_HELP",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_USAGE",
    "MODEL_HELP",
    "OFF",
    "Stages",
    "UsageError",
    "check_target",
    "default_calibration",
    "import_file",
    "load_model",
    "one_line",
    "prepared",
    "random_batches",
    "read_checkpoint",
    "require_file",
    "require_matplotlib",
    "require_output",
    "require_output_folder",
    "stage",
    "stages",
    "tty",
    "user_model_check",
    "warn",
    "write_json",
    "write_text",
]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_FAILURE = 0, 1, 2, 3
MODEL_HELP = "built-in name (tiny_convnet, cifar_resnet18 ...), package.module:factory or path/file.py:factory"
#: ``--min-sqnr off`` / ``--min-top1 off``: no threshold (verify's defaults apply when the option is not given)
OFF = "off"
CHECKPOINT_HELP = ("a qtrim_fx.checkpoint.save file, or a state_dict (torch.save) of the prepared model (e.g. after "
                   "training) or of the float model (then calibrated as without a checkpoint)")


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


def _split_spec(spec: str) -> tuple[str, str]:
    """``(file or module, factory)`` of a ``where:factory`` spec; :class:`UsageError` when malformed."""
    where, _, name = spec.rpartition(":")
    forms = "use a built-in name, package.module:factory or path/file.py:factory"
    if not name.isidentifier():
        raise UsageError(f"MODEL {spec!r}: {name!r} after the last ':' is not a factory name; {forms}")
    if not where:
        raise UsageError(f"MODEL {spec!r} names no module or file before ':'; {forms}")
    if not where.endswith(".py") and not all(part.isidentifier() for part in where.split(".")):
        raise UsageError(f"MODEL {spec!r}: {where!r} is neither a Python module name (package.module) "
                         f"nor a .py file; {forms}")
    return where, name


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
    where, name = _split_spec(spec)
    if where.endswith(".py"):
        require_file(where, "model file")
        module = import_file(Path(where))
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UsageError(f"cannot import {where!r}: {one_line(e)}") from None
        except Exception as e:  # the module's own code raised while importing
            raise UsageError(f"importing {where!r} failed: {type(e).__name__}: {one_line(e)}") from None
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


def _load_state(module: Any, state: Any, what: str, checkpoint: str, spec: str) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise UsageError(f"checkpoint {checkpoint!r} holds a {what} state_dict that does not fit "
                         f"{printable(spec)}: {one_line(e)}") from None


# --- preparation ---------------------------------------------------------------------------------------


def _fails_on(model: Any, inputs: tuple) -> BaseException | None:
    """The error the float ``model`` raises on ``inputs`` (eval mode, no grad), or None."""
    import torch

    training = model.training
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    except Exception as e:
        return e
    finally:
        model.train(training)
    return None


def user_model_check(spec: str, model: Any, inputs: tuple, e: BaseException) -> None:
    """After ``e`` while running the prepared model: :class:`UsageError` if the float model fails too.

    A MODEL whose own example inputs do not fit it (wrong shape, dtype) is the user's to fix (exit 2);
    a prepared model that fails where the float one runs is a qtrim_fx failure (``e`` is re-raised).
    """
    own = _fails_on(model, inputs)
    if own is not None:
        raise UsageError(f"MODEL {printable(spec)} fails on its own example inputs: {type(own).__name__}: "
                         f"{one_line(own)}") from None


def _prepare(spec: str, model: Any, inputs: tuple, saved: str | None, target: str | None = None) -> Any:
    """``qtrim_fx.prepare(model, target=target)``, or ``qtrim_fx.checkpoint.load(model, saved)`` for a saved checkpoint."""
    import qtrim_fx
    from qtrim_fx.core.errors import CheckpointError
    from qtrim_fx.train.checkpoint import load

    try:
        if saved is not None:
            return load(model, saved, example_inputs=inputs or None)
        return qtrim_fx.prepare(model, inputs or None, target=target)
    except CheckpointError as e:
        raise UsageError(f"checkpoint {saved!r}: {one_line(e)}") from None
    except SyntaxError as e:  # torch.fx writes module names into Python source
        raise UsageError(f"cannot prepare {printable(spec)}: torch.fx generated invalid Python ({one_line(e.msg)}) "
                         "from its module names; rename submodules whose names hold a quote, a newline or a "
                         "NUL") from None


def prepared(spec: str, checkpoint: str | None, calibrate: int | None,
             progress: Any = None, target: str | None = None) -> tuple[Any, Any, tuple]:
    """Load MODEL, load a checkpoint into it, prepare it and calibrate it, as the options ask.

    Args:
        spec: the MODEL spec (see :func:`load_model`).
        checkpoint: a ``--checkpoint`` file (see :func:`read_checkpoint`), or None. A float
            ``state_dict`` is loaded into the float model before it is prepared; a prepared one
            into the prepared model; a :func:`qtrim_fx.checkpoint.save` file is loaded with
            :func:`qtrim_fx.checkpoint.load` (prepared with its saved config).
        calibrate: number of random batches to calibrate on besides the example inputs (0: none;
            None: none when the checkpoint holds statistics, else 4).
        progress: the command's :class:`Stages`, or None.
        target: the export target. An integer-only one (``qnn``, ``npu``) is prepared for, so every op
            it runs gets its sites (no float islands), unless a checkpoint fixes the sites already
            (a prepared or saved one).

    Returns:
        ``(prepared model, the float model sharing its parameters, example inputs)``.
    """
    import qtrim_fx

    kind, state = read_checkpoint(checkpoint) if checkpoint else (None, None)
    model, inputs = load_model(spec)
    stage(progress, "prepare")
    if kind == "float":
        _load_state(model, state, "float model", checkpoint, spec)
    from qtrim_fx.core.profiles import get_profile

    for_target = target if target is not None and kind in (None, "float") and get_profile(target).integer_only else None
    qm = _prepare(spec, model, inputs, checkpoint if kind == "saved" else None, for_target)
    if kind == "prepared":
        _load_state(qm, state, "prepared model", checkpoint, spec)
    if calibrate is None:
        calibrate = 0 if kind in ("saved", "prepared") else 4
    if calibrate:
        if not inputs:
            raise UsageError(f"--calibrate needs example inputs; {printable(spec)} returned none")
        stage(progress, f"calibrate ({calibrate + 1} batches)")
        try:
            qtrim_fx.calibrate(qm, [inputs, *random_batches(inputs, calibrate)], progress=tty())
        except Exception as e:
            user_model_check(spec, model, inputs, e)
            raise
    return qm, model, inputs


def default_calibration(args: argparse.Namespace) -> int | None:
    """``--calibrate`` if given, else 4 without ``--checkpoint`` and None with one (see :func:`prepared`)."""
    if args.calibrate is not None:
        return args.calibrate
    return None if args.checkpoint else 4


# --- output helpers ------------------------------------------------------------------------------------


class Stages:
    """A one-line progress display over the named stages of a command (only when stderr is a terminal)."""

    def __init__(self, title: str, total: int) -> None:
        from tqdm.auto import tqdm

        self.title, self.total, self.done = title, total, -1
        self.bar = tqdm(total=total, desc=title, disable=not tty(), leave=False, file=real_stderr(),
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


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a failed write leaves the old file as it was."""
    from qtrim_fx.core.fileio import write_text_atomically

    write_text_atomically(path, text)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (non-finite floats written as "nan", "inf", "-inf")."""
    from qtrim_fx.verification.report import json_safe

    write_text(path, json.dumps(json_safe(data), indent=2) + "\n")
