"""The files a ``qtrim`` command reads and writes, checked before any slow work.

:func:`require_file` (an input: exists, is a regular file, is readable), :func:`require_output` and
:func:`require_output_folder` (an output the command may replace or create), and
:func:`read_checkpoint` (what a ``--checkpoint`` file holds). Each raises :class:`UsageError`
(exit 2, one line) saying what is wrong with the path. Names from the command line are shown with
control characters escaped.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qtrim_fx.tools.sanitize import one_line, printable

__all__ = ["ACCEPTED_CHECKPOINTS", "UsageError", "read_checkpoint", "require_file", "require_output",
           "require_output_folder"]

#: what ``--checkpoint`` accepts, as error messages say it
ACCEPTED_CHECKPOINTS = ("a qtrim_fx.checkpoint.save file, the state_dict of the prepared model or the state_dict "
                        "of the float model (torch.save(model.state_dict(), path))")


class UsageError(Exception):
    """A bad command line: printed as one line, exit code 2."""


# --- paths ---------------------------------------------------------------------------------------------

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def require_file(path: str, what: str) -> os.stat_result:
    """The ``stat`` of ``path`` if it is a regular file this process may read, else :class:`UsageError`.

    The message says what is wrong: ``"{what} {path!r} does not exist"``, is a directory, is a
    FIFO/device/socket, or cannot be read (permission denied).
    """
    shown = f"{what} {path!r}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{shown} does not exist") from None
    except NotADirectoryError:
        raise UsageError(f"{shown} does not exist (a parent of it is a file, not a folder)") from None
    except PermissionError:
        raise UsageError(f"cannot read {shown}: permission denied (on it or a folder above it)") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {shown}: {one_line(getattr(e, 'strerror', None) or e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{shown} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "a special file")
        raise UsageError(f"{shown} is {kind}, not a regular file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"cannot read {shown}: permission denied")
    return st


def _writable_folder(path: Path, shown: str) -> None:
    """:class:`UsageError` unless the nearest existing folder above ``path`` is one this process may write."""
    folder = path.absolute().parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {shown}: {str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {shown}: permission denied in folder {str(folder)!r}")


def require_output(path: str | os.PathLike[str], what: str = "output") -> None:
    """Check an output file before any slow work: :class:`UsageError` when it could not be written.

    Refused: a directory, FIFO, device or socket, a symlink loop, a read-only file, a folder that
    does not let this process create the file (what :func:`qtrim_fx.core.fileio.check_output_path` checks).
    """
    from qtrim_fx.core.errors import OutputPathError
    from qtrim_fx.core.fileio import check_output_path

    shown = f"{what} {os.fspath(path)!r}"
    try:
        target = check_output_path(path)
    except OutputPathError as e:
        raise UsageError(f"{what}: {one_line(e)}") from None
    except OSError as e:
        raise UsageError(f"cannot write {shown}: {one_line(e.strerror or e)}") from None
    _writable_folder(target, shown)


def require_output_folder(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """An output folder that exists or can be made: :class:`UsageError` when it is a file or not writable."""
    folder = Path(path)
    shown = f"{what} {os.fspath(path)!r}"
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise UsageError(f"{shown} exists and is not a folder")
    if os.path.isdir(folder):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write into {shown}: permission denied")
    else:
        _writable_folder(folder, shown)
    return folder


# --- checkpoints ---------------------------------------------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    import torch

    return (isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) or k.endswith("_extra_state") for k, v in obj.items()))


def _describe(obj: Any) -> str:
    """What a loaded file holds, in a few words (for error messages)."""
    import torch

    if isinstance(obj, Mapping):
        keys = [printable(k if isinstance(k, str) else repr(k)) for k in list(obj)[:6]]
        more = ", ..." if len(obj) > 6 else ""
        return f"a dict with keys {', '.join(keys)}{more}" if obj else "an empty dict"
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} item(s)"
    return f"a {type(obj).__name__}"


def read_checkpoint(path: str) -> tuple[str, Any]:
    """Read a ``--checkpoint`` file (``torch.load(weights_only=True)``) and tell what it holds.

    Returns:
        ``("saved", None)`` for a :func:`qtrim_fx.checkpoint.save` file (load it with
        :func:`qtrim_fx.checkpoint.load`), ``("prepared", state_dict)`` for a prepared model's
        ``state_dict`` (it has the ``qtrim_sites.*`` statistics), ``("float", state_dict)`` for
        any other ``state_dict`` (a float model's). A dict holding the state under ``"model"``,
        ``"state_dict"`` or ``"model_state_dict"`` (a training checkpoint) counts as that state.

    Raises:
        UsageError: the file is missing, empty, unreadable, or holds something else (the message
            says what it holds and what is accepted).
    """
    import pickle

    import torch

    from qtrim_fx.train.checkpoint import FORMAT

    shown = f"checkpoint {path!r}"
    if require_file(path, "checkpoint").st_size == 0:
        raise UsageError(f"{shown} is empty (0 bytes); give {ACCEPTED_CHECKPOINTS}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:  # a pickle of Python objects (a whole module): refused, never imported
            raise UsageError(f"{shown} holds a pickled {found.group(1)} object, which torch.load(weights_only=True) "
                             f"refuses (a whole module saved with torch.save(model)?); qtrim loads no code from a "
                             f"file: give {ACCEPTED_CHECKPOINTS}") from None
        raise UsageError(f"cannot read {shown}: it is not a torch.save file, or it is truncated; "
                         f"give {ACCEPTED_CHECKPOINTS}") from None
    except Exception as e:
        why = f"{type(e).__name__}: {one_line(e)}" if one_line(e) else type(e).__name__
        raise UsageError(f"cannot read {shown} ({why}): it is truncated or not written by torch.save; "
                         f"give {ACCEPTED_CHECKPOINTS}") from None
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return "saved", None
    state = obj
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        state = next((obj[k] for k in ("model", "state_dict", "model_state_dict") if _is_state_dict(obj.get(k))), obj)
    if not _is_state_dict(state):
        raise UsageError(f"{shown} holds {_describe(obj)}, not a model state; give {ACCEPTED_CHECKPOINTS}")
    prepared_keys = any(k.startswith(("qtrim_sites.", "qtrim_blend.")) for k in state)
    return ("prepared" if prepared_keys else "float"), state
