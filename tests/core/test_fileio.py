"""Output writes (``qtrim_fx.core.fileio``): atomic, refuse what is not a replaceable file, keep modes.

Special files (FIFO, device, socket) are only ever created and ``stat``-ed here, never opened: a
FIFO opened for writing would block until a reader comes, so every test also has a timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import qtrim_fx
from qtrim_fx.core.errors import OutputPathError
from qtrim_fx.core.fileio import (
    check_output_path,
    write_atomically,
    write_bytes_atomically,
    write_text_atomically,
)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.name != "posix", reason="FIFOs, modes, umask and signals are POSIX"),
]

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def temps(folder: Path) -> list[str]:
    """Hidden files in ``folder``: the temporary files of writes (``.<name>.qtrim-tmp-<pid>-<hex>``)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring the previous one after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


# -- refused targets ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_fifo_is_refused_and_left_a_fifo(tmp_path):
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    with pytest.raises(OutputPathError, match=r"out\.onnx.*FIFO \(named pipe\).*not a regular file"):
        write_bytes_atomically(fifo, b"model")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert temps(tmp_path) == []


@pytest.mark.timeout(30)
def test_character_device_is_refused_and_left_a_device(tmp_path):
    dev = tmp_path / "null"
    try:
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
    except (PermissionError, AttributeError, OSError) as e:
        pytest.skip(f"cannot create a character device here ({type(e).__name__}: {e}); needs root with CAP_MKNOD")
    with pytest.raises(OutputPathError, match="a character device"):
        write_bytes_atomically(dev, b"model")
    assert stat.S_ISCHR(os.lstat(dev).st_mode)
    assert temps(tmp_path) == []


def test_directory_and_socket_are_refused(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(OutputPathError, match="a directory"):
        write_text_atomically(folder, "x")
    sock_path = tmp_path / "s"  # AF_UNIX paths are short: tmp_path is
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.bind(str(sock_path))
        except OSError as e:
            pytest.skip(f"cannot bind a unix socket in {tmp_path}: {e}")
        with pytest.raises(OutputPathError, match="a socket"):
            write_text_atomically(sock_path, "x")
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)


def test_read_only_file_is_refused_even_as_root(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"good")
    path.chmod(0o444)
    with pytest.raises(OutputPathError, match=r"read-only \(mode 0444\).*chmod u\+w.*remove it"):
        write_bytes_atomically(path, b"new")
    assert path.read_bytes() == b"good" and mode(path) == 0o444
    assert temps(tmp_path) == []


def test_output_path_error_is_a_qtrim_error_and_a_value_error():
    assert issubclass(OutputPathError, qtrim_fx.QtrimError)
    assert issubclass(OutputPathError, ValueError)
    assert qtrim_fx.OutputPathError is OutputPathError


# -- symlinks -----------------------------------------------------------------------------------


def test_symlink_is_followed_and_kept(tmp_path):
    real_dir = tmp_path / "store"
    real_dir.mkdir()
    real = real_dir / "model.onnx"
    real.write_bytes(b"old")
    real.chmod(0o640)
    link = tmp_path / "latest.onnx"
    link.symlink_to(Path("store") / "model.onnx")
    written = write_bytes_atomically(link, b"new")
    assert link.is_symlink() and os.readlink(link) == os.path.join("store", "model.onnx")
    assert real.read_bytes() == b"new" and mode(real) == 0o640
    assert written == real.resolve()
    assert temps(tmp_path) == [] and temps(real_dir) == []


def test_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "out.json"
    link.symlink_to(tmp_path / "made.json")
    write_text_atomically(link, "{}\n")
    assert link.is_symlink() and (tmp_path / "made.json").read_text() == "{}\n"


@pytest.mark.timeout(30)
def test_symlink_to_a_fifo_and_a_symlink_loop_are_refused(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "out.onnx"
    link.symlink_to(fifo)
    with pytest.raises(OutputPathError, match=r"out\.onnx \(which resolves to .*pipe\).*FIFO"):
        write_bytes_atomically(link, b"x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(OutputPathError, match="symlink loop"):
        write_bytes_atomically(a, b"x")
    assert a.is_symlink() and b.is_symlink()


# -- modes and owner ----------------------------------------------------------------------------


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_file_honours_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    path = write_text_atomically(tmp_path / "report.md", "# ok\n")
    assert mode(path) == expected


def test_overwritten_file_keeps_its_mode(tmp_path, umask):
    umask(0o077)  # would give 0600 to a new file
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    path.chmod(0o640)
    write_bytes_atomically(path, b"new")
    assert path.read_bytes() == b"new" and mode(path) == 0o640


@pytest.mark.skipif(not IS_ROOT, reason="only root can give a file to another user")
def test_overwritten_file_keeps_its_owner_as_root(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    os.chown(path, 12345, 23456)
    write_bytes_atomically(path, b"new")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (12345, 23456)


# -- failures and interruptions -----------------------------------------------------------------


def test_exception_in_the_callback_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "qm.pt"
    path.write_bytes(b"good")

    def fail(f):
        f.write(b"partial" * 1000)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_atomically(path, fail)
    assert path.read_bytes() == b"good"
    assert temps(tmp_path) == []


def test_handlers_are_restored_and_a_returning_handler_lets_the_write_finish(tmp_path):
    seen = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        mine = signal.getsignal(signal.SIGTERM)

        def write(f):
            f.write(b"a")
            os.kill(os.getpid(), signal.SIGTERM)  # handled in this thread before the next bytecode
            f.write(b"b")

        write_atomically(tmp_path / "out.bin", write)
        assert seen == [signal.SIGTERM]
        assert (tmp_path / "out.bin").read_bytes() == b"ab"
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_raising_handler_aborts_the_write_cleanly(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"good")
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, lambda f: (f.write(b"new"), os.kill(os.getpid(), signal.SIGINT), f.write(b"!")))
    assert path.read_bytes() == b"good" and temps(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is before


def test_a_thread_writes_without_touching_handlers(tmp_path):
    import threading

    before = signal.getsignal(signal.SIGTERM)
    errors: list[BaseException] = []

    def run():
        try:
            write_text_atomically(tmp_path / "t.txt", "x")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors == [] and (tmp_path / "t.txt").read_text() == "x"
    assert signal.getsignal(signal.SIGTERM) is before


#: child processes import only qtrim_fx.core (not torch, through qtrim_fx/__init__): they start fast
CHILD_PRELUDE = textwrap.dedent(f"""
    import sys, types
    _pkg = types.ModuleType("qtrim_fx")
    _pkg.__path__ = [{str(Path(qtrim_fx.__file__).parent)!r}]
    sys.modules["qtrim_fx"] = _pkg
""")

SLOW_WRITER = CHILD_PRELUDE + textwrap.dedent("""
    import sys, time
    from qtrim_fx.core.fileio import write_atomically

    def slow(f):
        f.write(b"x" * 100_000)
        f.flush()
        print("writing", flush=True)
        for _ in range(2000):
            f.write(b"y" * 1000)
            f.flush()
            time.sleep(0.01)

    write_atomically(sys.argv[1], slow)
    print("finished", flush=True)
""")


def _start_slow_writer(path: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    if line.strip() != "writing":
        child.kill()
        pytest.fail(f"the writer did not start: {line!r} {child.communicate()[1][-2000:]}")
    assert len(temps(path.parent)) == 1  # mid-write: its temporary file exists
    return child


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_sigint_mid_write_leaves_no_temp(tmp_path, signum):
    path = tmp_path / "qm.pt"
    path.write_bytes(b"good")
    child = _start_slow_writer(path)
    child.send_signal(signum)
    out, err = child.communicate(timeout=60)
    # SIGTERM: the default action, re-raised; SIGINT: KeyboardInterrupt, with which Python exits by SIGINT
    assert child.returncode == -signum, err[-2000:]
    assert "finished" not in out
    if signum == signal.SIGINT:
        assert "KeyboardInterrupt" in err
    assert path.read_bytes() == b"good"
    assert temps(tmp_path) == []


def test_temp_of_a_killed_writer_is_swept_by_the_next_write(tmp_path):
    path = tmp_path / "qm.pt"
    path.write_bytes(b"good")
    child = _start_slow_writer(path)
    child.kill()  # SIGKILL: no handler runs, the temporary file stays
    child.communicate(timeout=60)
    (orphan,) = temps(tmp_path)
    assert f"-{child.pid}-" in orphan and path.read_bytes() == b"good"
    # a live writer's temp (this process's parent stands in) and another target's temp stay
    live = tmp_path / f".qm.pt.qtrim-tmp-{os.getppid()}-abc123"
    other = tmp_path / f".other.pt.qtrim-tmp-{child.pid}-abc123"
    live.write_bytes(b"")
    other.write_bytes(b"")
    write_bytes_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    assert temps(tmp_path) == sorted([live.name, other.name])


def test_file_size_limit_keeps_the_old_file(tmp_path):
    path = tmp_path / "report.html"
    path.write_text("<p>good</p>")
    code = CHILD_PRELUDE + textwrap.dedent("""
        import resource, sys
        from qtrim_fx.core.fileio import write_text_atomically
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            write_text_atomically(sys.argv[1], "x" * 100_000)
        except OSError as e:
            print("OSError", e.errno)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("OSError"), out.stderr[-2000:]
    assert path.read_text() == "<p>good</p>"
    assert temps(tmp_path) == []


# -- variants and callers -----------------------------------------------------------------------


def test_text_and_bytes_variants_and_new_folders(tmp_path):
    p = write_text_atomically(tmp_path / "a" / "b" / "r.svg", "<svg>é</svg>\n")
    assert p.read_bytes() == "<svg>é</svg>\n".encode()
    assert write_bytes_atomically(str(tmp_path / "x.bin"), b"\x00\x01").read_bytes() == b"\x00\x01"
    assert check_output_path(tmp_path / "new.onnx") == (tmp_path / "new.onnx").resolve()


@pytest.fixture(scope="module")
def tiny_calibrated():
    from qtrim_fx.models import get_model

    m, (x,) = get_model("tiny_mlp")
    qm = qtrim_fx.prepare(m)
    qtrim_fx.calibrate(qm, [x])
    return qm, x


@pytest.mark.timeout(60)
def test_export_onnx_onto_a_fifo_is_refused(tmp_path, tiny_calibrated):
    qm, x = tiny_calibrated
    fifo = tmp_path / "model.qdq.onnx"
    os.mkfifo(fifo)
    with pytest.raises(OutputPathError, match="FIFO"):
        qtrim_fx.export_onnx(qm, (x,), fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert temps(tmp_path) == []


@pytest.mark.timeout(60)
def test_export_and_checkpoint_through_a_symlink_and_onto_read_only(tmp_path, tiny_calibrated, umask):
    qm, x = tiny_calibrated
    umask(0o022)
    real = tmp_path / "real.onnx"
    link = tmp_path / "model.onnx"
    link.symlink_to(real)
    qtrim_fx.export_onnx(qm, (x,), link)
    assert link.is_symlink() and real.stat().st_size > 0 and mode(real) == 0o644
    ckpt = tmp_path / "qm.pt"
    ckpt.write_bytes(b"keep")
    ckpt.chmod(0o444)
    with pytest.raises(OutputPathError, match="read-only"):
        qtrim_fx.checkpoint.save(qm, ckpt)
    assert ckpt.read_bytes() == b"keep"
    assert temps(tmp_path) == []
