"""The ``qtrim`` command line against hostile and careless input (review #19 of the CLI).

1. ``--checkpoint`` takes a ``qtrim_fx.checkpoint.save`` file, a prepared model's ``state_dict`` and a
   float model's ``state_dict``; anything else is exit 2 naming what the file holds.
2. Usage errors (bad paths, malformed MODEL specs, counts <= 0, NaN thresholds) are exit 2 with one
   line saying what is wrong; ``--min-sqnr off`` turns a default threshold off.
3. Whatever libraries print (warnings, log lines, FX tracebacks, C-level writes to fd 2) never breaks
   the "one line on stderr" of exit 2 and 3, and is summarized after a result.
4. The default verify thresholds fail a bad file (exit 1); a MODEL reference that builds another
   random model on each call is reported.
5. Names from models and files reach the terminal, Markdown, SVG, HTML and DOT escaped.
6. Outputs are written atomically, and every argument is checked before the first file is written.

Most cases run in process (``main(argv)``, stderr read at the file-descriptor level with ``capfd``);
the few that need a fresh process (the one-line promise end to end, ``ulimit -f``) run as subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import onnx
import pytest
import torch
from qtrim_fx.models import get_model

import qtrim_fx
import qtrim_fx.core.fileio as fileio
import qtrim_fx.tools.cli as cli
from qtrim_fx.tools.cli import main
from qtrim_fx.tools.cli_common import prepared
from qtrim_fx.tools.graph_view import graph_to_networkx, to_dot, to_html, to_svg

ROOT = Path(__file__).resolve().parents[2]
ESC, BEL = "\x1b", "\x07"
#: a submodule name nn.Module.add_module accepts (no '.', not empty) with an ANSI sequence, a bell, a C1
#: control, a bidi override and Markdown/HTML syntax; '"', '\n', '\r' and NUL break FX's code generation
HOSTILE = "evil\x1b[31m|x`<b>&\x07\x85\u202e"

MODELS_PY = textwrap.dedent('''
    import logging
    import os
    import warnings

    import torch
    from torch import nn


    def seeded():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), (torch.randn(2, 4),)


    def unseeded():  # another random model on every call
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), (torch.randn(2, 4),)


    def noisy_bad_shape():  # prints on stderr in every way a library can, and its example input does not fit
        torch.manual_seed(0)
        warnings.warn("first noisy warning", UserWarning)
        warnings.warn("second noisy warning", UserWarning)
        warnings.warn("a runtime warning", RuntimeWarning)
        logging.getLogger("somelib").warning("a log line")
        os.write(2, b"[W:onnxruntime:fake] a C-level log line\\n")
        return nn.Sequential(nn.Linear(4, 2)), (torch.randn(2, 3),)


    def quoted():  # torch.fx writes this name into Python source it cannot compile
        torch.manual_seed(0)
        m = nn.Sequential()
        m.add_module('q"uote', nn.Linear(4, 3))
        return m, (torch.randn(2, 4),)


    def hostile():
        torch.manual_seed(0)
        m = nn.Sequential()
        m.add_module(%r, nn.Linear(4, 3))
        m.add_module("ok", nn.ReLU())
        return m, (torch.randn(2, 4),)
''') % HOSTILE


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with the factories above (as ``m.py``), tiny_convnet checkpoints and a QDQ export."""
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "m.py").write_text(MODELS_PY)
    model, inputs = get_model("tiny_convnet")
    with torch.no_grad():  # weights unlike a fresh build, to see which ones were loaded
        for p in model.parameters():
            p.add_(0.5)
    torch.save(model.state_dict(), tmp / "float.pt")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp / "training.pt")
    qm = qtrim_fx.prepare(model, inputs)
    qtrim_fx.calibrate(qm, [inputs])
    torch.save(qm.state_dict(), tmp / "prepared.pt")
    qtrim_fx.checkpoint.save(qm, tmp / "saved.pt")
    torch.save(model, tmp / "module.pt")  # a whole-module pickle
    torch.save([1, 2, 3], tmp / "list.pt")
    torch.save({"note": "hello", "lr": 0.1}, tmp / "strings.pt")
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp / "other.pt")
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "garbage.pt").write_bytes(b"not a torch file at all" * 10)
    (tmp / "folder.pt").mkdir()
    (tmp / "folder.py").mkdir()
    cwd = Path.cwd()
    os.chdir(tmp)
    try:
        assert main(["export", "tiny_convnet", "--calibrate", "2", "-o", "t.onnx"]) == 0
    finally:
        os.chdir(cwd)
    return {"tmp": tmp, "model": model, "qm": qm}


def run(argv: list[str], capfd, cwd: Path | None = None) -> tuple[int, str, str]:
    """``main(argv)`` in ``cwd``: (exit code, stdout, stderr), stderr as file descriptor 2 saw it."""
    capfd.readouterr()
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    finally:
        os.chdir(old)
    out, err = capfd.readouterr()
    return code, out, err


def assert_usage_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and err.endswith("\n"), err  # one line, nothing else
    for f in fragments:
        assert f in err, f"{f!r} not in {err!r}"


# --- 1. --checkpoint -----------------------------------------------------------------------------------


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_save_file_is_loaded_like_checkpoint_load(work, capfd):
    qm, _, _ = prepared("tiny_convnet", str(work["tmp"] / "saved.pt"), None)
    assert _same_state(qm, work["qm"])  # weights, statistics and λ of the saved model
    code, out, err = run(["inspect", "tiny_convnet", "--checkpoint", "saved.pt"], capfd, work["tmp"])
    assert code == 0, err
    assert "no statistics yet" not in out  # the saved statistics are there without --calibrate


def test_prepared_state_dict_is_still_accepted(work):
    qm, _, _ = prepared("tiny_convnet", str(work["tmp"] / "prepared.pt"), None)
    assert _same_state(qm, work["qm"])


@pytest.mark.parametrize("name", ["float.pt", "training.pt"])
def test_float_state_dict_is_loaded_before_prepare_then_calibrated(work, name):
    qm, model, _ = prepared("tiny_convnet", str(work["tmp"] / name), None)
    ref = work["model"].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())  # the file's weights
    assert torch.equal(qm.get_parameter("conv1.weight"), ref["conv1.weight"])
    # no statistics in a float state_dict: calibrated as without a checkpoint (4 batches + the example)
    assert all(site.observer.initialized for _, site, _ in qtrim_fx.iter_sites(qm))


def test_float_state_dict_export(work, capfd):
    code, _out, err = run(["export", "tiny_convnet", "--checkpoint", "float.pt", "-o", "f.onnx"], capfd, work["tmp"])
    assert code == 0, err
    onnx.checker.check_model(onnx.load(work["tmp"] / "f.onnx"))


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("list.pt", ["holds a list of 3 item(s)", "qtrim_fx.checkpoint.save file", "float model"]),
        ("strings.pt", ["holds a dict with keys note, lr", "not a model state", "prepared model"]),
        ("module.pt", ["weights_only=True", "torch.save(model)", "qtrim_fx.checkpoint.save file"]),
        ("garbage.pt", ["cannot read checkpoint 'garbage.pt'", "qtrim_fx.checkpoint.save file"]),
        ("other.pt", ["holds a float model state_dict that does not fit tiny_convnet", "Missing key"]),
        ("empty.pt", ["checkpoint 'empty.pt' is empty (0 bytes)"]),
        ("folder.pt", ["checkpoint 'folder.pt' is a directory, not a file"]),
    ],
)
def test_other_checkpoints_are_usage_errors_naming_what_they_hold(work, capfd, name, fragments):
    code, out, err = run(["inspect", "tiny_convnet", "--checkpoint", name], capfd, work["tmp"])
    assert_usage_error(code, out, err, *fragments)
    assert "cannot read checkpoint 'empty.pt':\n" not in err  # the old message, with nothing after the colon


# --- 2. usage errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["inspect", ":"], "MODEL ':'"),
        (["inspect", "pkg.mod:"], "not a factory name"),
        (["inspect", ":factory"], "names no module or file"),
        (["inspect", "..rel:factory"], "neither a Python module name"),
        (["inspect", "a b:factory"], "neither a Python module name"),
        (["inspect", "tiny_convnet", "--calibrate", "-1"], "--calibrate: must be at least 0"),
        (["export", "tiny_convnet", "-o", "x.onnx", "--calibrate", "-3"], "--calibrate: must be at least 0"),
        (["export", "tiny_convnet", "-o", "x.onnx", "--opset", "0"], "--opset: must be at least 1"),
        (["vendors", "tiny_convnet", "--calib-batches", "0"], "--calib-batches: must be at least 1"),
        (["vendors", "tiny_convnet", "--eval-batches", "-1"], "--eval-batches: must be at least 1"),
        (["vendors", "tiny_convnet", "--backends", "onnxruntime,tensorrt"], "unknown backend(s) 'tensorrt'"),
        (["verify", "t.onnx", "--reference", "tiny_convnet", "--batch-size", "0"], "--batch-size: must be at least 1"),
        (["verify", "t.onnx", "--reference", "tiny_convnet", "--batches", "0"], "--batches: must be at least 1"),
        (["verify", "t.onnx", "--reference", "tiny_convnet", "--min-sqnr", "nan"], "--min-sqnr: must be a finite"),
        (["verify", "t.onnx", "--reference", "tiny_convnet", "--min-sqnr", "inf"], "--min-sqnr: must be a finite"),
        (["verify", "t.onnx", "--reference", "tiny_convnet", "--min-top1", "nan"], "--min-top1: must be a finite"),
        (["verify", "t.onnx", "--reference", "tiny_convnet", "--min-top1", "1.5"], "--min-top1: must be in [0, 1]"),
        (["verify", "t.onnx", "--reference", "tiny_convnet", "--min-top1", "-0.1"], "--min-top1: must be in [0, 1]"),
        (["verify", "t.onnx", "--reference", "tiny_convnet", "--qnn-option", "soc_model"], "--qnn-option takes KEY=VALUE"),
        (["verify", "t.onnx", "--reference", "tiny_convnet", "--qnn-option", "=60"], "--qnn-option takes KEY=VALUE"),
        (["report", "tiny_convnet", "-o", "r", "--epochs", "0"], "--epochs: must be at least 1"),
        (["report", "tiny_convnet", "-o", "r", "--every", "0"], "--every: must be at least 1"),
        (["report", "tiny_convnet", "-o", "r", "--warmup", "nan"], "--warmup: must be a finite number"),
        (["check", "folder.pt"], "file 'folder.pt' is a directory, not a file"),
        (["check", "empty.pt", "--json", "folder.pt"], "--json: cannot write folder.pt: it is a directory"),
        (["verify", "t.onnx", "--reference", "folder.onnx"], "'folder.onnx' is a directory"),
        (["inspect", "folder.py:build"], "model file 'folder.py' is a directory, not a file"),
        (["inspect", "tiny_convnet", "--json", "folder.pt"], "--json: cannot write folder.pt: it is a directory"),
        (["export", "tiny_convnet", "-o", "folder.pt"], "-o: cannot write folder.pt: it is a directory"),
        (["verify", "t.onnx", "--reference", "tiny_convnet", "--markdown", "folder.pt"], "--markdown: cannot write"),
        (["report", "tiny_convnet", "-o", "t.onnx"], "-o 't.onnx' exists and is not a folder"),
    ],
)
def test_usage_errors_are_exit_2_with_one_line(work, capfd, argv, fragment):
    (work["tmp"] / "folder.onnx").mkdir(exist_ok=True)
    code, out, err = run(argv, capfd, work["tmp"])
    assert_usage_error(code, out, err, fragment)
    assert out == ""


def test_read_only_output_is_refused_before_any_work(work, capfd):
    target = work["tmp"] / "ro.json"
    target.write_text("{}")
    target.chmod(0o444)
    try:
        code, out, err = run(["inspect", "no_such_model", "--json", "ro.json"], capfd, work["tmp"])
    finally:
        target.chmod(0o644)
    assert_usage_error(code, out, err, "--json: cannot overwrite ro.json: it is read-only")


def test_permission_error_anywhere_is_a_usage_error(monkeypatch, capfd):
    def denied(args):
        raise PermissionError(13, "Permission denied", "secret.onnx")

    monkeypatch.setattr(cli, "_cmd_check", denied)
    code, out, err = run(["check", "secret.onnx"], capfd)
    assert_usage_error(code, out, err, "PermissionError", "Permission denied", "secret.onnx")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads and writes any file")
def test_unreadable_input_and_unwritable_folder(work, capfd):
    secret = work["tmp"] / "secret.onnx"
    secret.write_bytes(b"x")
    secret.chmod(0)
    locked = work["tmp"] / "locked"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o500)
    try:
        assert_usage_error(*run(["check", "secret.onnx"], capfd, work["tmp"]), "permission denied")
        assert_usage_error(*run(["export", "tiny_convnet", "-o", "locked/x.onnx"], capfd, work["tmp"]),
                           "permission denied")
    finally:
        secret.chmod(0o644)
        locked.chmod(0o700)


def test_verify_help_says_how_to_turn_a_threshold_off(capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--min-sqnr DB|off" in out and "off: no SQNR threshold" in out
    assert "--min-top1 F|off" in out and "off: no top-1 threshold" in out


# --- 3. one line on stderr -----------------------------------------------------------------------------


def _noise() -> None:
    """What a library may print while a command runs (logging is left to the subprocess test: pytest
    captures log records itself)."""
    import warnings

    warnings.warn("library warning one", UserWarning, stacklevel=2)
    warnings.warn("library warning two", UserWarning, stacklevel=2)
    warnings.warn("library runtime warning", RuntimeWarning, stacklevel=2)
    print("Traceback-looking text\n  line 2", file=sys.stderr)
    sys.stderr.flush()
    os.write(2, b"[W:onnxruntime:fake] a C-level log line\n")


@pytest.mark.parametrize(("error", "code"), [(RuntimeError("boom\nsecond line"), 3), (cli.UsageError("bad"), 2)])
def test_errors_after_library_noise_are_one_line(monkeypatch, capfd, error, code):
    def noisy(args):
        _noise()
        raise error

    monkeypatch.setattr(cli, "_cmd_check", noisy)
    got, _out, err = run(["check", "x.onnx"], capfd)
    assert got == code
    assert err.count("\n") == 1 and err.startswith("qtrim: error: "), err


def test_library_noise_is_summarized_after_a_result(monkeypatch, capfd):
    def noisy(args):
        _noise()
        return 0

    monkeypatch.setattr(cli, "_cmd_check", noisy)
    code, out, err = run(["check", "x.onnx"], capfd)
    assert code == 0 and out == ""
    lines = err.splitlines()
    assert lines == [
        "qtrim: warning: library warning one (and 1 more UserWarning; --verbose shows them)",
        "qtrim: warning: library runtime warning",
        "qtrim: note: 3 line(s) that libraries printed on stderr were hidden; --verbose shows them",
    ], err
    code, _out, err = run(["--verbose", "check", "x.onnx"], capfd)  # everything, as it comes
    assert code == 0 and "library warning two" in err and "C-level log line" in err and "line 2" in err


def _subprocess(*args: str, cwd: Path, prefix: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("QTRIM_TRACEBACK", None)
    cmd = " ".join([prefix, sys.executable, "-m", "qtrim_fx.tools.cli", *args])
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, text=True, capture_output=True, timeout=180,
                          stdin=subprocess.DEVNULL)


def test_fx_traceback_and_noise_do_not_break_the_one_line_promise(work):
    # the example input does not fit the model: FX prints its own traceback while calibrating
    r = _subprocess("inspect", "m.py:noisy_bad_shape", "--calibrate", "1", cwd=work["tmp"])
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1, r.stderr
    assert "MODEL m.py:noisy_bad_shape fails on its own example inputs: RuntimeError: mat1 and mat2" in r.stderr
    assert r.stdout == ""


# --- 4. verify: default thresholds, non-deterministic reference ----------------------------------------


def test_verify_default_thresholds_fail_a_bad_file_and_off_turns_them_off(work, capfd):
    tmp = work["tmp"]
    assert run(["export", "m.py:unseeded", "--calibrate", "1", "-o", "u.onnx"], capfd, tmp)[0] == 0
    argv = ["verify", "u.onnx", "--reference", "m.py:unseeded", "--backends", "onnxruntime", "--batches", "2"]
    code, out, err = run([*argv, "--json", "u.json"], capfd, tmp)
    assert code == 1, out + err
    assert "verify: ok" not in out and "FAIL: onnxruntime output output: SQNR" in out
    assert json.loads((tmp / "u.json").read_text())["failures"]
    # a factory that rebuilds another random model: one warning line
    warning = [line for line in err.splitlines() if "not deterministic" in line]
    assert len(warning) == 1 and err.count("\n") == 1, err
    assert "seed the factory" in warning[0] and "--checkpoint" in warning[0]
    code, out, err = run([*argv, "--min-sqnr", "off", "--min-top1", "off"], capfd, tmp)
    assert code == 0 and "verify: ok" in out, out + err


def test_deterministic_factory_gives_no_warning(work, capfd):
    from qtrim_fx.tools.cli_verify import check_deterministic

    sys.path.insert(0, str(work["tmp"]))
    try:
        model, inputs = cli.load_model(str(work["tmp"] / "m.py") + ":seeded")
        assert check_deterministic(str(work["tmp"] / "m.py") + ":seeded", model, inputs)
        model, inputs = cli.load_model(str(work["tmp"] / "m.py") + ":unseeded")
        assert not check_deterministic(str(work["tmp"] / "m.py") + ":unseeded", model, inputs)
    finally:
        sys.path.remove(str(work["tmp"]))
    assert "not deterministic" in capfd.readouterr().err  # outside a command: printed at once


# --- 5. names reach outputs escaped --------------------------------------------------------------------


def test_sanitizers():
    from qtrim_fx.tools.sanitize import markdown, markup, one_line, printable

    assert printable("conv1.weight") == "conv1.weight" and printable("a\x1b[2Jb\x07\x85\u202e\t") == (
        "a\\x1b[2Jb\\x07\\x85\\u202e\\x09")
    assert printable("a\nb", keep="\n") == "a\nb"
    assert markup("<b>&\"\x00") == "&lt;b&gt;&amp;&quot;\\x00"
    md = markdown("a|b`c*d_e[f]<g>&\n\\")
    assert "|" not in md and "<" not in md and ">" not in md and "\n" not in md
    assert md == "a&#124;b\\`c\\*d\\_e\\[f\\]&lt;g&gt;&amp;\\\\x0a\\\\"
    assert one_line("two\nlines \x1b[31m") == "two lines \\x1b[31m"


def _no_controls(text: str) -> bool:
    return not any((ord(c) < 32 and c not in "\n") or 0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in text)


def test_hostile_module_names_in_inspect_table_and_graphs(work, capfd):
    tmp = work["tmp"]
    code, out, err = run(["inspect", "m.py:hostile", "--calibrate", "1", "--graph", "h.svg", "--graph", "h.html",
                          "--graph", "h.dot", "--json", "h.json"], capfd, tmp)
    assert code == 0, err
    assert _no_controls(out) and ESC not in out and BEL not in out
    assert "evil\\x1b[31m|x`<b>&\\x07\\x85\\u202e.weight" in out  # shown, escaped
    svg = (tmp / "h.svg").read_text()
    root = ET.fromstring(svg)  # well-formed XML despite the control characters
    texts = "".join(root.itertext())
    assert "evil\\x1b[31m|x`<b>&" in texts and ESC not in svg and "<b>" not in svg
    html = (tmp / "h.html").read_text()
    assert _no_controls(html) and "<b>" not in html and "evil\\x1b[31m|x`&lt;b&gt;&amp;" in html
    assert _no_controls((tmp / "h.dot").read_text())
    names = [row["name"] for row in json.loads((tmp / "h.json").read_text())["rows"]]
    assert HOSTILE + ".weight" in names  # JSON keeps the real name (json escapes it)


def test_module_name_fx_cannot_compile_is_a_usage_error(work, capfd):
    code, out, err = run(["inspect", "m.py:quoted"], capfd, work["tmp"])
    assert_usage_error(code, out, err, "torch.fx cannot generate code for this model",
                       "rename those submodules")


def test_rendering_functions_escape_names_given_directly():
    model = torch.nn.Sequential()
    model.add_module(HOSTILE, torch.nn.Linear(4, 3))
    qm = qtrim_fx.prepare(model)
    g = graph_to_networkx(qm)
    ET.fromstring(to_svg(g))
    for text in (to_svg(g), to_html(g, qm), to_dot(g), qtrim_fx.inspect(qm).table()):
        assert _no_controls(text), text


def test_verify_markdown_and_table_escape_output_names(work, capfd):
    tmp = work["tmp"]
    model = onnx.load(tmp / "t.onnx")
    old, new = model.graph.output[0].name, "out|`<i>x</i>\x1b[2J*_y_"
    for node in model.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
    model.graph.output[0].name = new
    onnx.save(model, tmp / "named.onnx")
    code, out, err = run(["verify", "named.onnx", "--reference", "tiny_convnet", "--backends", "onnxruntime",
                          "--batches", "1", "--markdown", "r.md", "--json", "r.json"], capfd, tmp)
    assert code == 0, out + err
    assert ESC not in out and "out|`<i>x</i>\\x1b[2J*_y_" in out
    md = (tmp / "r.md").read_text()
    assert ESC not in md and "<i>" not in md
    row = next(line for line in md.splitlines() if line.startswith("| onnxruntime |"))
    assert row.count(" | ") == 9  # 10 cells: the name's '|' splits none
    assert "out&#124;\\`&lt;i&gt;x&lt;/i&gt;\\\\x1b\\[2J\\*\\_y\\_" in row
    assert json.loads((tmp / "r.json").read_text())["output_names"] == [new]


# --- 6. atomic outputs, arguments checked before writing -----------------------------------------------


def test_failing_writes_leave_the_old_files_intact(work, capfd, monkeypatch):
    tmp = work["tmp"] / "atomic"
    tmp.mkdir()
    argv = ["inspect", "tiny_convnet", "--graph", "g.html", "--graph", "g.svg", "--json", "s.json"]
    assert run(argv, capfd, tmp)[0] == 0
    good = {p.name: p.read_bytes() for p in tmp.iterdir()}
    assert set(good) == {"g.html", "g.svg", "s.json"}

    def fail_after_writing(fd):
        raise OSError(27, "File too large")  # EFBIG, as under ulimit -f, once the data is written

    monkeypatch.setattr(fileio.os, "fsync", fail_after_writing)
    code, _out, err = run([*argv, "--calibrate", "1"], capfd, tmp)
    assert code == 3 and err.count("\n") == 1 and "File too large" in err
    assert {p.name: p.read_bytes() for p in tmp.iterdir()} == good  # old files intact, no temporary files


def test_ulimit_on_file_size_keeps_an_existing_graph(work):
    tmp = work["tmp"] / "ulimit"
    tmp.mkdir()
    assert _subprocess("inspect", "tiny_convnet", "--graph", "g.html", cwd=tmp).returncode == 0
    good = (tmp / "g.html").read_bytes()
    assert len(good) > 8 * 1024
    r = _subprocess("inspect", "tiny_convnet", "--graph", "g.html", cwd=tmp, prefix="ulimit -f 8;")
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r
    assert (tmp / "g.html").read_bytes() == good and sorted(p.name for p in tmp.iterdir()) == ["g.html"]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--backends", "bogus"], "unknown backend(s) 'bogus'"),
        (["--backends", "onnxruntime,bogus"], "unknown backend(s) 'bogus'"),
        (["--target", "no_such_target"], "unknown target 'no_such_target'"),
        (["--p-clip", "1.5"], "p_clip"),
        (["--checkpoint", "missing.pt"], "checkpoint 'missing.pt' does not exist"),
    ],
)
def test_report_checks_every_argument_before_writing(tmp_path, capfd, extra, fragment):
    code, out, err = run(["report", "tiny_convnet", "-o", "rep", *extra], capfd, tmp_path)
    assert_usage_error(code, out, err, fragment)
    assert list(tmp_path.iterdir()) == []  # no folder, no file


def test_report_refuses_a_folder_where_one_of_its_files_goes(work, capfd):
    tmp = work["tmp"] / "rep_blocked"
    (tmp / "verify.json").mkdir(parents=True)
    code, out, err = run(["report", "tiny_convnet", "-o", str(tmp)], capfd)
    assert_usage_error(code, out, err, "verify.json", "is a directory")
    assert [p.name for p in tmp.iterdir()] == ["verify.json"]  # nothing written
