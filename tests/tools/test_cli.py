"""The ``qtrim`` command line, run as subprocesses on tiny_convnet.

Every subprocess pays the torch import (~3 s here), so independent commands are started together
in two waves (everything that needs no exported file, then everything that reads it).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from qtrim_fx.models import get_model

import qtrim_fx
from qtrim_fx.tools.cli import main

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMEOUT_S = 180


@dataclass
class Run:
    args: list[str]
    proc: subprocess.Popen
    _done: tuple[int, str, str] | None = None

    def result(self) -> tuple[int, str, str]:
        if self._done is None:
            out, err = self.proc.communicate(timeout=TIMEOUT_S)
            self._done = (self.proc.returncode, out, err)
        return self._done

    @property
    def rc(self) -> int:
        return self.result()[0]

    @property
    def out(self) -> str:
        return self.result()[1]

    @property
    def err(self) -> str:
        return self.result()[2]

    def __str__(self) -> str:
        rc, out, err = self.result()
        return f"qtrim {' '.join(self.args)} -> {rc}\nstdout:\n{out}\nstderr:\n{err}"


def _start(*args: str, cwd: Path) -> Run:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("QTRIM_TRACEBACK", None)
    proc = subprocess.Popen([sys.executable, "-m", "qtrim_fx.tools.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    return Run(list(args), proc)


USAGE_ERRORS = {  # run as subprocesses; more cases run in process below (each subprocess costs ~2 s of CPU)
    "bad model": ["inspect", "no_such_model"],
    "missing file": ["check", "missing.onnx"],
    "unknown target": ["export", "tiny_convnet", "-o", "x.onnx", "--target", "no_such_target"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Wave 1: inspect, export, report and the usage errors; wave 2: check and verify."""
    tmp = tmp_path_factory.mktemp("cli")
    wave1 = {
        "inspect": _start("inspect", "tiny_convnet", "--calibrate", "2", "--graph", "g.dot", "--graph", "g.svg",
                          "--graph", "g.html", "--json", "sites.json", cwd=tmp),
        "export": _start("export", "tiny_convnet", "--calibrate", "2", "-o", "t.onnx", cwd=tmp),
        "report": _start("report", "tiny_convnet", "-o", "rep", "--calibrate", "1", "--backends", "onnxruntime",
                         "--epochs", "30", "--warmup", "5", "--ramp-end", "15", "--horizon", "10", cwd=tmp),
        **{name: _start(*args, cwd=tmp) for name, args in USAGE_ERRORS.items()},
    }
    assert wave1["export"].rc == 0, str(wave1["export"])
    model = onnx.load(tmp / "t.onnx")
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    del q.input[2]  # planted violation: a QuantizeLinear without its zero point
    onnx.save(model, tmp / "bad.onnx")
    wave2 = {
        "check": _start("check", "t.onnx", "--target", "onnxruntime", cwd=tmp),
        "check_bad": _start("check", "bad.onnx", "--target", "onnxruntime", cwd=tmp),
        "verify": _start("verify", "t.onnx", "--reference", "tiny_convnet", "--backends", "onnxruntime,openvino",
                         "--batches", "2", "--json", "verify.json", cwd=tmp),
    }
    yield {"tmp": tmp, **wave1, **wave2}
    for r in (*wave1.values(), *wave2.values()):
        if r.proc.poll() is None:
            r.proc.kill()


@pytest.fixture(scope="module")
def site_names() -> list[str]:
    model, _ = get_model("tiny_convnet")
    return [spec.name for spec, _, _ in qtrim_fx.iter_sites(qtrim_fx.prepare(model))]


# --- inspect -------------------------------------------------------------------------------------------


def test_inspect_prints_every_site(runs, site_names):
    r = runs["inspect"]
    assert r.rc == 0, str(r)
    assert "site" in r.out and "scheme" in r.out
    for name in site_names:
        assert f"\n{name} " in r.out
    data = json.loads((runs["tmp"] / "sites.json").read_text())
    assert [row["name"] for row in data["rows"]] == site_names
    assert "qtrim inspect [" not in r.err  # no progress bar when stderr is not a terminal


def test_inspect_target_notes_the_sites_it_drops():
    model, inputs = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model, inputs)
    qtrim_fx.calibrate(qm, [inputs])
    plain = qtrim_fx.inspect(qm)
    report = qtrim_fx.inspect(qm, target="tensorrt")
    prefix = "dropped for tensorrt: "
    dropped = {r.name: n.removeprefix(prefix) for r in report.rows for n in r.notes if n.startswith(prefix)}
    outputs = {r.name for r in plain.rows if r.role == "output"}
    assert outputs and set(dropped) == outputs  # TensorRT takes no Q on Conv/Gemm/MatMul outputs
    assert all("tensorrt" in why for why in dropped.values())
    # the target only adds notes, and the default table is the one without it (the model is not changed)
    for a, b in zip(plain.rows, report.rows, strict=True):
        assert b.notes[: len(a.notes)] == a.notes and (a.name, a.scale, a.clipped) == (b.name, b.scale, b.clipped)
    assert qtrim_fx.inspect(qm).table() == plain.table() and "dropped for" not in plain.table()
    ort_dropped = {r.name: n for r in qtrim_fx.inspect(qm, target="onnxruntime").rows for n in r.notes
                   if n.startswith("dropped for")}
    assert set(ort_dropped) == {"fc.out"} and "model output" in ort_dropped["fc.out"]  # the logits stay float


def test_inspect_target_option(capsys):
    assert main(["inspect", "tiny_convnet", "--calibrate", "1", "--target", "tensorrt"]) == 0
    out = capsys.readouterr().out
    assert "\nfc.out " in out and "dropped for tensorrt: output of a weighted op" in out


def test_inspect_graph_dot(runs, site_names):
    dot = (runs["tmp"] / "g.dot").read_text()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    assert "cluster_legend" in dot and "weight site" in dot and "activation site" in dot
    for name in site_names:
        assert f'"qtrim_sites_{name.replace(".", "_")}" [label="{name}\\n' in dot
    assert dot.count("shape=hexagon") == len(site_names) + 2  # the sites + two legend entries


def test_inspect_graph_svg(runs, site_names):
    svg = (runs["tmp"] / "g.svg").read_text()
    root = ET.fromstring(svg)  # well-formed XML
    assert root.tag.endswith("svg")
    ns = {"s": "http://www.w3.org/2000/svg"}
    site_groups = [g for g in root.iter(f"{{{ns['s']}}}g") if "_site" in g.get("class", "")]
    labels = {"".join(g.find("s:text", ns).itertext()) for g in site_groups}
    assert labels == set(site_names)
    assert all(g.find("s:polygon", ns) is not None for g in site_groups)  # hexagons, not boxes
    assert "Legend" in svg and "weight site (observer + blend-quant)" in svg


def test_inspect_graph_html_is_self_contained(runs, site_names):
    page = (runs["tmp"] / "g.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "Legend" in page
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert "Quantization sites" in page
    for name in site_names:
        assert f">{name}</a>" in page  # a row of the sites table, linked to its node


# --- export / check ------------------------------------------------------------------------------------


def test_export_writes_a_valid_file(runs):
    r = runs["export"]
    assert r.rc == 0 and "wrote t.onnx" in r.out, str(r)
    model = onnx.load(runs["tmp"] / "t.onnx")
    onnx.checker.check_model(model)
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)


@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_export_for_an_integer_only_target_prepares_for_it(target, tmp_path, capsys):
    # a model with a Concat -> GlobalAveragePool (float islands unless prepared for the target) passes its check
    out = tmp_path / "m.onnx"
    assert main(["export", "tiny_convnet", "--calibrate", "1", "-o", str(out), "--target", target]) == 0
    assert main(["check", str(out), "--target", target]) == 0, capsys.readouterr().out
    assert qtrim_fx.onnx.check(out, target) == []


def test_check_clean_export(runs):
    r = runs["check"]
    assert r.rc == 0, str(r)
    assert "0 violation(s)" in r.out


def test_check_defaults_to_the_target_the_file_was_written_for(tmp_path, capsys):
    """``qtrim check FILE`` of a qnn file checks it against qnn (its ``qtrim_fx.target`` stamp), not onnxruntime."""
    model, ex = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model, ex, target="qnn")
    qtrim_fx.calibrate(qm, [ex])
    qtrim_fx.set_blend(qm, 1.0)
    path = tmp_path / "tiny.qnn.onnx"
    qtrim_fx.export_onnx(qm.eval(), ex, str(path))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "target 'qnn': the file was written for it" in out and "of target 'qnn'" in out
    assert main(["check", str(path), "--target", "tensorrt"]) in (0, 1)
    assert "of target 'tensorrt'" in capsys.readouterr().out
    m = onnx.load(str(path))
    for prop in m.metadata_props:
        if prop.key == "qtrim_fx.target":
            prop.value = "no-such-target"
    onnx.save(m, str(tmp_path / "odd.onnx"))
    main(["check", str(tmp_path / "odd.onnx")])
    out = capsys.readouterr().out
    assert "names target 'no-such-target', which is not known here" in out and "of target 'onnxruntime'" in out


def test_check_finds_planted_violation(runs):
    r = runs["check_bad"]
    assert r.rc == 1, str(r)
    assert "zero_point_missing" in r.out
    # the Q without its zero point now writes on zero point 0 while its DQ reads on the file's own: a shifted
    # pair as well, unless that zero point was 0
    rules = {line.split("]", 1)[1].split(":", 1)[0].strip() for line in r.out.splitlines() if line.startswith("[")}
    assert rules in ({"zero_point_missing"}, {"zero_point_missing", "qdq_pair_mismatch"}), r.out
    assert f"{sum(line.startswith('[') for line in r.out.splitlines())} violation(s)" in r.out


# --- verify --------------------------------------------------------------------------------------------


def _formats(x) -> set[str]:
    if isinstance(x, str):  # inf / nan in JSON
        return {x}
    if x is None:
        return {"-"}
    return {f"{x:.2f}", f"{x:.3e}", f"{x:.6f}", f"{100 * x:.2f}%", f"{1000 * x:.2f}", str(x)}


def _json_figures(data: dict) -> set[str]:
    figures = {str(data["num_batches"]), str(data["num_samples"])}
    results = [*data["backends"], *data["pairs"]]
    for res in results:
        figures |= _formats(res.get("seconds", 0.0))
        for o in res["outputs"]:
            figures |= {str(d) for d in o["shape"]} | {"x".join(map(str, o["shape"]))}
            for key in ("mse", "sqnr_db", "max_abs_err", "cosine", "top1"):
                figures |= _formats(o[key])
    return figures


def _is_figure(token: str) -> bool:
    try:
        float(token.rstrip("%"))
    except ValueError:
        return token in ("inf", "nan") or ("x" in token and all(p.isdigit() for p in token.split("x")))
    return True


def test_verify_json_holds_every_figure_of_the_table(runs):
    r = runs["verify"]
    assert r.rc == 0, str(r)
    data = json.loads((runs["tmp"] / "verify.json").read_text())
    by_name = {b["backend"]: b for b in data["backends"]}
    assert set(by_name) == {"onnxruntime", "openvino"}
    assert all(b["status"] == "ok" for b in by_name.values())
    assert [(p["a"], p["b"]) for p in data["pairs"]] == [("onnxruntime", "openvino")]
    assert data["failures"] == []
    for backend in by_name.values():
        sqnr = backend["outputs"][0]["sqnr_db"]
        assert isinstance(sqnr, float) and 15 < sqnr < 80
    # the table: both backends, side by side, and the pairwise section
    assert "Backends vs reference" in r.out and "Backend pairs" in r.out and "Side by side" in r.out
    side = r.out[r.out.index("Side by side"):].splitlines()
    assert side[1].split() == ["metric", "onnxruntime", "openvino"]
    figures = _json_figures(data)
    infos = [b["info"] for b in data["backends"]]
    for line in r.out.splitlines():
        if line.startswith("- "):  # notes: how each backend ran
            assert any(info and info in line for info in infos), line
            continue
        if line.startswith("qtrim verify:"):
            continue
        for token in line.replace(";", " ").replace(",", " ").split():
            if _is_figure(token):
                assert token in figures, f"{token!r} of line {line!r} is not in the JSON report"


# --- report / plots ------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="plots need matplotlib")
def test_report_writes_plots(runs):
    r = runs["report"]
    assert r.rc == 0, str(r)
    out = runs["tmp"] / "rep"
    for name in ("curriculum.png", "weights.png", "layer_sqnr.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        assert f"wrote {out.relative_to(runs['tmp']) / name}" in r.out
    assert "<svg" in (out / "graph.html").read_text()
    onnx.checker.check_model(onnx.load(out / "model.qdq.onnx"))
    report = json.loads((out / "verify.json").read_text())
    assert report["per_layer"]["status"] == "ok" and report["per_layer"]["layers"]
    assert all(math.isfinite(float(la["sqnr_db"])) for la in report["per_layer"]["layers"])


# --- usage errors, help --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_exit_2_with_one_line(runs, case):
    r = runs[case]
    assert r.rc == 2, str(r)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], str(r)
    assert "Traceback" not in r.err and r.out == ""


def test_usage_error_messages_say_what_is_wrong(runs):
    assert "unknown model 'no_such_model'" in runs["bad model"].err
    assert "'missing.onnx' does not exist" in runs["missing file"].err
    assert "unknown target 'no_such_target'" in runs["unknown target"].err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "missing_dir/model.py:build", "-o", "x.onnx"], "model file 'missing_dir/model.py' does not exist"),
        (["inspect", "no_such_package.models:build"], "cannot import 'no_such_package.models'"),
        (["inspect", "models:no_such_factory"], "'models' has no callable 'no_such_factory'"),
        (["verify", "t.onnx"], "the following arguments are required: --reference"),
        (["check", "t.onnx", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["inspect", "tiny_convnet", "--graph", "g.png"], "use a .html, .svg or .dot file name"),
        (["inspect", "tiny_convnet", "--checkpoint", "missing.pt"], "checkpoint 'missing.pt' does not exist"),
        (["inspect", "tiny_convnet", "--target", "no_such_target"], "unknown target 'no_such_target'"),
        (["inspect", "tiny_convnet", "--target", "tensorrt"], "--target tensorrt needs statistics"),
        (["verify", "missing.onnx", "--reference", "tiny_convnet"], "'missing.onnx' does not exist"),
    ],
)
def test_more_usage_errors_in_process(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err
    assert captured.out == ""


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("inspect", "export", "check", "verify", "report"):
        assert command in out


@pytest.mark.parametrize("command", ["inspect", "export", "check", "verify", "report"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: qtrim {command}") and "example:" in out


def test_unexpected_failure_is_one_line_exit_3(monkeypatch, capsys):
    import qtrim_fx.tools.cli as cli

    def boom(args):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(cli, "_cmd_check", boom)
    assert cli.main(["check", "whatever.onnx"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: something broke second line" in err
    with pytest.raises(RuntimeError):
        cli.main(["--traceback", "check", "whatever.onnx"])
