"""What a ``qtrim`` command prints on stderr: its own lines, not what the libraries print.

The CLI promises one line on stderr for an error (exit 2 or 3). torch, ONNX Runtime, OpenVINO and
the user's model code print too: Python warnings, ``logging`` records, FX's "Call using an
FX-traced Module" traceback, C++ log lines written straight to file descriptor 2. While a command
runs, :func:`held_stderr` holds all of that back:

* Python warnings are recorded (DeprecationWarning, FutureWarning and torch's "NumPy array is
  not writable" notice are dropped);
* writes to ``sys.stderr`` are counted and dropped, except progress-bar redraws (``"\\r..."``) when
  the real stderr is a terminal;
* file descriptor 2 is pointed at a temporary file (C/C++ libraries, worker processes), whose lines
  are counted and dropped.

When the command ends, :meth:`Held.summary` gives the lines to print after a result (exit 0 or 1):
the CLI's own warnings (:func:`warn`), one line per warning category (its first message and how
many others there were) and one note with the number of library lines hidden. After an error the
CLI prints its error line alone. ``qtrim --verbose`` (and ``--traceback``) holds nothing back.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

from qtrim_fx.tools.sanitize import one_line

__all__ = ["Held", "held_stderr", "real_stderr", "show_warning", "tty", "warn"]

#: warnings that say nothing to a ``qtrim`` user (dropped while held; shown with --verbose)
_NOISE = ("The given NumPy array is not writable",)


class Held:
    """What :func:`held_stderr` kept back while a command ran."""

    def __init__(self, stream: TextIO, holding: bool) -> None:
        self.stream = stream  # the real stderr: the CLI's own lines and progress bars go there
        self.holding = holding
        self.own: list[str] = []
        self.warnings: list[warnings.WarningMessage] = []
        self.hidden_lines = 0

    def summary(self) -> list[str]:
        """The lines to print on stderr after a result: own warnings, one per warning category, a note."""
        lines = [f"qtrim: warning: {m}" for m in dict.fromkeys(self.own)]
        by_category: dict[type, list[str]] = {}
        for w in self.warnings:
            by_category.setdefault(w.category, []).append(one_line(w.message))
        for category, messages in by_category.items():
            distinct = list(dict.fromkeys(messages))
            more = (f" (and {len(distinct) - 1} more {category.__name__}; --verbose shows them)"
                    if len(distinct) > 1 else "")
            lines.append(f"qtrim: warning: {distinct[0]}{more}")
        if self.hidden_lines:
            lines.append(f"qtrim: note: {self.hidden_lines} line(s) that libraries printed on stderr were hidden; "
                         "--verbose shows them")
        return lines


_active: Held | None = None


def real_stderr() -> TextIO:
    """Where the CLI's own stderr lines go: the real stderr, also while a command's output is held."""
    return _active.stream if _active is not None else sys.stderr


def tty() -> bool:
    """Whether the real stderr is a terminal (progress bars are shown only then)."""
    try:
        return real_stderr().isatty()
    except (AttributeError, ValueError):
        return False


def warn(message: str) -> None:
    """A warning of the CLI itself: printed after the command's result (at once with ``--verbose``)."""
    text = one_line(message)
    if _active is not None and _active.holding:
        _active.own.append(text)
    else:
        print(f"qtrim: warning: {text}", file=real_stderr())


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for ``--verbose``: one line per warning, with its category."""
    print(f"qtrim: warning: {category.__name__}: {one_line(message)}", file=real_stderr())


class _HeldStream(io.TextIOBase):
    """``sys.stderr`` while held: counts lines, forwards progress-bar redraws to a terminal."""

    def __init__(self, held: Held) -> None:
        self._held = held
        self._terminal = tty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def buffer(self) -> _HeldBytes:  # for libraries that write bytes to sys.stderr.buffer
        return _HeldBytes(self._held)

    def write(self, s: str) -> int:
        if self._terminal and s.startswith("\r"):
            self._held.stream.write(s)
            self._held.stream.flush()
        else:
            self._held.hidden_lines += s.count("\n")
        return len(s)


class _HeldBytes(io.RawIOBase):
    """``sys.stderr.buffer`` while held: counts lines."""

    def __init__(self, held: Held) -> None:
        self._held = held

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._held.hidden_lines += data.count(b"\n")
        return len(data)


def _count_lines(f: Any) -> int:
    f.seek(0)
    n, last = 0, b"\n"
    while chunk := f.read(1 << 16):
        n += chunk.count(b"\n")
        last = chunk[-1:]
    return n + (last != b"\n")


@contextlib.contextmanager
def _fd2_to(held: Held, original: TextIO) -> Iterator[None]:
    """Point file descriptor 2 at a temporary file while the block runs (no-op where fd 2 is closed)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as sink:
        with contextlib.suppress(Exception):
            original.flush()
        try:
            uses_fd2 = original.fileno() == 2
        except (AttributeError, OSError, ValueError):
            uses_fd2 = False
        if uses_fd2:  # the CLI's own lines must still reach the real fd 2
            held.stream = open(os.dup(saved), "w", encoding=getattr(original, "encoding", None) or "utf-8",  # noqa: SIM115
                               errors="backslashreplace", buffering=1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.__stderr__.flush()
            with contextlib.suppress(Exception):
                original.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if held.stream is not original:
                held.stream.close()
                held.stream = original
            held.hidden_lines += _count_lines(sink)


@contextlib.contextmanager
def held_stderr(hold: bool) -> Iterator[Held]:
    """Run a command with what libraries print on stderr held back (``hold=False``: shown as it comes).

    Yields:
        The :class:`Held` record; read :meth:`Held.summary` after the block.
    """
    global _active
    original = sys.stderr
    held = Held(original, hold)
    previous, _active = _active, held
    try:
        with warnings.catch_warnings(record=hold) as caught:
            if not hold:
                warnings.showwarning = show_warning
                yield held
                return
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            for text in _NOISE:
                warnings.filterwarnings("ignore", message=text)
            with _fd2_to(held, original):
                sys.stderr = _HeldStream(held)
                try:
                    yield held
                finally:
                    sys.stderr = original
            held.warnings = list(caught or ())
    finally:
        _active = previous
