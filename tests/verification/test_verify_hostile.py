"""verify() on inputs that used to pass or hang: empty batches, bad thresholds, poor files, noisy
references, files that declare huge inputs; and the public names of the verification modules."""

from __future__ import annotations

import ast
import math
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qtrim_fx.verification
from qtrim_fx.core.errors import ConfigError
from qtrim_fx.verification import report as report_module
from qtrim_fx.verification import run
from qtrim_fx.verification.metrics import _Accumulator
from qtrim_fx.verification.run import verify

NOOPT = ["onnxruntime-noopt"]
W = (np.arange(6 * 5, dtype=np.float32).reshape(6, 5) % 7 - 3) / 4


def _matmul_file(path: Path, weight: np.ndarray = W, shape=("batch", 6)) -> str:
    """y = x @ weight, batch dimension symbolic."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape[0], weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, path)
    return str(path)


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    return {"ref": _matmul_file(tmp_path / "ref.onnx"), "neg": _matmul_file(tmp_path / "neg.onnx", -W)}


def _batches(n: int = 2, rows: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((rows, 6)).astype(np.float32) for _ in range(n)]


# -- zero samples ----------------------------------------------------------------------------
def test_batch_without_samples_is_an_error(files):
    with pytest.raises(ConfigError, match="no values"):
        verify(files["ref"], files["ref"], [np.zeros((0, 6), np.float32)], backends=NOOPT)
    with pytest.raises(ConfigError, match="no values"):
        verify(files["ref"], files["ref"], [*_batches(1), torch.zeros(0, 6)], backends=NOOPT)
    with pytest.raises(ConfigError, match="empty"):
        verify(files["ref"], files["ref"], [], backends=NOOPT)


def test_nothing_compared_is_not_a_perfect_score():
    acc = _Accumulator()
    acc.update(np.zeros((0, 5)), np.zeros((0, 5)))
    m = acc.metrics("y")
    assert math.isnan(m.sqnr_db) and math.isnan(m.mse) and m.top1 is None  # was SQNR inf, MSE 0


# -- thresholds ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [{"min_sqnr_db": math.nan}, {"min_sqnr_db": math.inf}, {"min_top1": math.nan},
                                 {"min_top1": 1.5}])
def test_non_finite_thresholds_are_rejected(bad, files):
    with pytest.raises(ConfigError, match="min_"):
        verify(files["ref"], files["ref"], _batches(1), backends=NOOPT, **bad)
    report = verify(files["ref"], files["ref"], _batches(1), backends=NOOPT)
    with pytest.raises(ConfigError, match="min_"):
        report.failures(**bad)


def test_default_thresholds_fail_a_poor_file(files):
    assert (run.DEFAULT_MIN_SQNR_DB, run.DEFAULT_MIN_TOP1) == (20.0, 0.9)
    report = verify(files["neg"], files["ref"], _batches(), backends=NOOPT)  # y = -x @ W: -6 dB, 0 % top-1
    (out,) = report.backends[0].outputs
    assert out.sqnr_db < 0 and out.top1 == 0.0
    failures = report.failures()
    assert not report.ok() and any("SQNR" in f for f in failures) and any("top-1" in f for f in failures)
    assert report.to_dict()["min_sqnr_db"] == 20.0  # the JSON says what it was held to
    assert report.ok(min_sqnr_db=-100.0, min_top1=0.0)  # overridable per call ...
    assert verify(files["neg"], files["ref"], _batches(), backends=NOOPT, min_sqnr_db=None, min_top1=None).ok()
    good = verify(files["ref"], files["ref"], _batches(), backends=NOOPT)  # ... and a good file passes
    assert good.ok() and good.failures() == []


# -- a reference that is not reproducible ----------------------------------------------------
class _MatMul(torch.nn.Module):
    def __init__(self, noise: float = 0.0) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.from_numpy(W.copy()))
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w
        return y + self.noise * torch.randn_like(y) if self.noise else y


def test_non_reproducible_torch_reference_warns(files):
    with pytest.warns(UserWarning, match="different outputs for the same input"):
        verify(files["ref"], _MatMul(noise=0.1), _batches(), backends=NOOPT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = verify(files["ref"], _MatMul(), _batches(), backends=NOOPT)
    assert report.ok()


# -- files that declare huge inputs, or are not files ----------------------------------------
def test_random_inputs_refuse_a_huge_declared_input(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 40000, 40000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 40000, 40000])],
    )  # fmt: skip
    path = tmp_path / "huge.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ConfigError, match=r"4,800,000,000 values.*MAX_GENERATED_ELEMENTS = 67,108,864.*smaller inputs"):
        run.random_inputs(path)
    assert run.MAX_GENERATED_ELEMENTS == 2**26
    batches = run.random_inputs(_matmul_file(tmp_path / "mm.onnx"), num_batches=2, batch_size=3)
    assert [b[0].shape for b in batches] == [(3, 6), (3, 6)] and batches[0][0].dtype == np.float32
    assert np.array_equal(run.random_inputs(tmp_path / "mm.onnx", 2, 3)[1][0], batches[1][0])  # seeded


@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_model_path_that_is_a_fifo_or_junk(files, tmp_path):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        verify(fifo, files["ref"], _batches(1), backends=NOOPT)
    with pytest.raises(ConfigError, match="not a regular file"):
        verify(files["ref"], str(fifo), _batches(1), backends=NOOPT)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07not onnx\xff\xff")
    with pytest.raises(ConfigError, match="does not parse"):
        verify(junk, files["ref"], _batches(1), backends=NOOPT)


# -- public names ------------------------------------------------------------------------------
def _private_imports(folder: Path) -> list[str]:
    """``from qtrim_fx.x import _name`` across modules, in every file of ``folder``."""
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qtrim_fx"):
                found += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_verification_imports_no_private_name():
    assert _private_imports(Path(qtrim_fx.verification.__file__).parent) == []
    for old in ("_db", "_pct", "_sci", "_cos", "_json_safe"):
        assert not hasattr(report_module, old)  # tools/ imports the public names now
    assert report_module.format_db(math.inf) == "inf" and report_module.json_safe([math.nan]) == ["nan"]
