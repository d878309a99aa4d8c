"""File output shared by checkpoints, exports and reports: never a partially written file.

::

    write_atomically(path, lambda f: torch.save(obj, f))   # binary, through a callback
    write_bytes_atomically(path, data)                      # bytes
    write_text_atomically(path, text)                       # JSON, markdown, HTML, SVG, ...
    check_output_path(path)                                 # the checks alone, before a slow job

Every write goes to a temporary file in the target's folder (``.<name>.qtrim-tmp-<pid>-<hex>``),
is flushed and fsynced, and is renamed over the target: readers see the old file or the complete
new one, and an error in the middle (an exception, a full disk, ``ulimit -f``) leaves the old
file untouched and no temporary file behind. What the path may be:

* **a new file**: created with ``0666 & ~umask`` (like ``open(path, "w")``), parent folders made;
* **a regular file**: replaced; it keeps its permission bits (``rwx`` of user/group/other; the
  setuid/setgid/sticky bits are dropped) and, when running as root, its owner and group. A file
  with several hard links is replaced under this name only;
* **a symlink**: followed to its final target, which is written (atomically, in the target's
  folder) while the link stays a link; a dangling link creates its target;
* **refused** with :class:`OutputPathError`, nothing touched: a directory, FIFO, character or
  block device, socket, a symlink loop, or a file whose mode forbids writing (``0444``: checked on
  the mode bits, so root is refused too; ``chmod u+w`` it or remove it to overwrite it).

Interruptions: SIGTERM and SIGINT during a write (main thread) remove the temporary file before
the previous handler runs (``KeyboardInterrupt`` as usual; a default SIGTERM still ends the
process with that signal). A process killed outright (SIGKILL, power loss) can leave its
temporary file; the next write of the same target removes those whose process is gone (the pid
is checked on this machine, so folders shared between machines keep other hosts' files).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from qtrim_fx.core.errors import ConfigError, OutputPathError

__all__ = [
    "OutputPathError",
    "check_output_path",
    "file_kind",
    "require_regular_input",
    "write_atomically",
    "write_bytes_atomically",
    "write_text_atomically",
]

_TMP_TAG = ".qtrim-tmp-"
_NEW_FILE_MODE = 0o666  # the kernel applies the umask, as for open(path, "w")
_PERMISSION_BITS = 0o777
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT") if hasattr(signal, name))

StrPath = str | os.PathLike[str]


# -- public API ---------------------------------------------------------------------------------


def check_output_path(path: StrPath) -> Path:
    """The file a write to ``path`` lands in (symlinks followed), or :class:`OutputPathError`.

    Call it before a slow job (an export) so a bad ``-o`` fails at once; the writers below run it
    again right before they write.

    Raises:
        OutputPathError: ``path`` is (or links to) a directory, FIFO, device or socket, is a
            symlink loop, or is a file whose mode forbids writing.
    """
    return _checked_target(Path(path))[0]


def write_atomically(path: StrPath, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then rename.

    The rename is atomic on one file system: readers see the old file or the complete new one,
    and an error (or SIGTERM/SIGINT) in ``write`` leaves the old file intact and no temporary
    file behind. Symlinks are followed (the link stays, its target is written); see the module
    docstring for modes, ownership and the paths that are refused.

    Args:
        path: output file (``str`` or path-like).
        write: called once with a binary file open for writing; its return value is ignored.

    Returns:
        The file written: ``path`` with symlinks resolved.

    Raises:
        OutputPathError: ``path`` is not a writable regular file or a new one (nothing touched).
        OSError: the write itself failed (disk full, file size limit, ...); the old file is intact.
    """
    target, st = _checked_target(Path(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(target)
    fd, tmp = _create_temp(target)
    try:
        with _remove_on_signal(tmp):
            with os.fdopen(fd, "wb") as f:
                if st is not None:
                    _copy_owner_and_mode(f.fileno(), st)
                write(f)
                f.flush()
                os.fsync(f.fileno())
            _checked_target(Path(path))  # the target may have changed during a long write
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    return target


def write_bytes_atomically(path: StrPath, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`write_atomically`)."""
    return write_atomically(path, lambda f: f.write(data))


def write_text_atomically(path: StrPath, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, encoded with ``encoding`` (see :func:`write_atomically`).

    Newlines are written as they are in ``text`` (no ``os.linesep`` translation).
    """
    return write_bytes_atomically(path, text.encode(encoding))


# -- target checks ------------------------------------------------------------------------------


def _checked_target(path: Path) -> tuple[Path, os.stat_result | None]:
    """``(resolved target, its stat or None when new)``; raises :class:`OutputPathError` if refused."""
    target = Path(os.path.realpath(path))
    shown = str(path) if target == Path(os.path.abspath(path)) else f"{path} (which resolves to {target})"
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return target, None
    except NotADirectoryError as e:
        raise OutputPathError(f"cannot write {shown}: a parent of it is a file, not a folder; "
                              "choose an output path inside a folder") from e
    if stat.S_ISLNK(st.st_mode):  # realpath stops on a loop and returns a link
        raise OutputPathError(f"cannot write {path}: it is a symlink loop; remove the link or point it at a file")
    if not stat.S_ISREG(st.st_mode):
        raise OutputPathError(f"cannot write {shown}: it is {file_kind(st.st_mode)}, not a regular file, and qtrim_fx "
                              "replaces its outputs as a whole; give the path of a file (e.g. model.onnx)")
    if not _mode_allows_write(st):
        raise OutputPathError(f"cannot overwrite {shown}: it is read-only (mode {stat.S_IMODE(st.st_mode):04o}); "
                              "make it writable (chmod u+w) or remove it, or choose another output path")
    return target, st


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages: ``a directory``, ``a FIFO (named pipe)``, ..."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")



def require_regular_input(path: StrPath, what: str, fix: str) -> None:
    """Refuse an input path that is missing or not a regular file, before anything opens it.

    A FIFO or device could block a reader forever; a folder is a user's slip. Raises
    ``FileNotFoundError`` (missing) or :class:`~qtrim_fx.core.errors.ConfigError` naming what it is and ``fix``.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} does not exist") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{what} {path!r} is not a regular file ({file_kind(mode)}); {fix}")


def _mode_allows_write(st: os.stat_result) -> bool:
    """Whether the mode bits let this user write the file; root counts as its owner (no bypass)."""
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None:  # Windows: only the read-only attribute, shown as the write bits
        return bool(st.st_mode & stat.S_IWUSR)
    uid = geteuid()
    if uid in (0, st.st_uid):
        return bool(st.st_mode & stat.S_IWUSR)
    if st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        return bool(st.st_mode & stat.S_IWGRP)
    return bool(st.st_mode & stat.S_IWOTH)


# -- temporary files ----------------------------------------------------------------------------


def _create_temp(target: Path) -> tuple[int, str]:
    """Create ``.<name>.qtrim-tmp-<pid>-<hex>`` beside ``target`` (mode ``0666 & ~umask``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(target.parent / f".{target.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(6)}")
        try:
            return os.open(tmp, flags, _NEW_FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(target.parent))


def _copy_owner_and_mode(fd: int, st: os.stat_result) -> None:
    """Give the temporary file the replaced file's owner (best effort) and permission bits."""
    own = os.fstat(fd)
    if hasattr(os, "fchown") and (own.st_uid, own.st_gid) != (st.st_uid, st.st_gid):
        with contextlib.suppress(OSError):  # only root may give a file away
            os.fchown(fd, st.st_uid, st.st_gid)
    if hasattr(os, "fchmod"):
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & _PERMISSION_BITS)


def _sweep_stale_temps(target: Path) -> None:
    """Remove ``target``'s temporary files left by processes that no longer run (SIGKILL, crash)."""
    if os.name != "posix":
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}{re.escape(_TMP_TAG)}(\d+)-[0-9a-f]+")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        stale = target.parent / name
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(stale).st_mode):
                os.unlink(stale)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this machine (ours, or any we cannot tell, count as alive)."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs under another user
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (best effort; not every platform can open a folder)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- signals ------------------------------------------------------------------------------------


#: temporary files being written now (all threads); a signal's default action removes them all.
_pending: set[str] = set()


@contextlib.contextmanager
def _remove_on_signal(tmp: str) -> Iterator[None]:
    """While the body runs, SIGTERM/SIGINT remove ``tmp`` before doing what they did before.

    Handlers are set only in the main thread (the only one that may set them) and restored after.
    A previous Python handler is called as is: if it raises (``KeyboardInterrupt``), the writer's
    cleanup removes ``tmp``; if it returns, the write goes on. A previous default action removes
    every pending temporary file, restores the default and re-raises the signal, so the process
    still ends with it. Ignored signals stay ignored.
    """
    _pending.add(tmp)
    previous: dict[int, Any] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                old = signal.getsignal(signum)
                if old is None or old == signal.SIG_IGN:  # set outside Python (cannot restore), or ignored
                    continue
                signal.signal(signum, _chained_handler(old))
                previous[signum] = old
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        _pending.discard(tmp)


def _chained_handler(old: Any) -> Callable[[int, Any], None]:
    def on_signal(signum: int, frame: Any) -> None:
        if callable(old):
            old(signum, frame)  # raises -> the writers remove their files; returns -> the writes go on
            return
        for tmp in list(_pending):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    return on_signal
