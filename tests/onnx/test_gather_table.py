"""QuantizeGatherTablePass: lookups' Q/DQ move onto the table (bit-identical values); OpenVINO compiles embeddings."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qtrim_fx
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.onnx.check import check
from qtrim_fx.onnx.gather_table_qdq import QuantizeGatherTablePass, quantize_linear
from qtrim_fx.runtime.prepared import set_blend

OPENVINO = get_profile("openvino")


def _embeddings(per_channel: bool = False, extra_reader: bool = False) -> onnx.ModelProto:
    """ids -> Gather(tok) -> Q -> DQ ─┐
       pos -> Gather(pos) -> Q -> DQ ─┴ Add -> y"""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((50, 6)).astype(np.float32), "tok"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32) * 0.1, "pos"),
             numpy_helper.from_array(np.array(0.021, np.float32), "s1"),
             numpy_helper.from_array(np.array(120, np.uint8), "z1"),
             numpy_helper.from_array(np.array(0.0013, np.float32), "s2"),
             numpy_helper.from_array(np.array(131, np.uint8), "z2"),
             numpy_helper.from_array(np.full(6, 0.02, np.float32), "sc"),
             numpy_helper.from_array(np.full(6, 128, np.uint8), "zc")]
    s2, z2 = ("sc", "zc") if per_channel else ("s2", "z2")
    nodes = [
        helper.make_node("Gather", ["tok", "ids"], ["t"]), helper.make_node("QuantizeLinear", ["t", "s1", "z1"], ["tq"]),
        helper.make_node("DequantizeLinear", ["tq", "s1", "z1"], ["td"]),
        helper.make_node("Gather", ["pos", "pids"], ["p"]),
        helper.make_node("QuantizeLinear", ["p", s2, z2], ["pq"], axis=-1),
        helper.make_node("DequantizeLinear", ["pq", s2, z2], ["pd"], axis=-1),
        helper.make_node("Add", ["td", "pd"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 6])]
    if extra_reader:  # the lookup itself is read by a float op too
        nodes.append(helper.make_node("Relu", ["t"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 4, 6]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 4]),
                                           helper.make_tensor_value_info("pids", TensorProto.INT64, [1, 4])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ids = np.array([[0, 7, 49, 3], [1, 1, 2, 30]], np.int64)
    return sess.run(None, {"ids": ids, "pids": np.arange(4, dtype=np.int64)[None]})


def _apply(model: onnx.ModelProto, profile=OPENVINO) -> tuple[onnx.ModelProto, bool]:
    ir_model = ir.from_proto(model)
    result = QuantizeGatherTablePass(profile)(ir_model)
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    return out, result.modified


def test_quantize_linear_matches_onnxruntime():
    x = np.array([-3.0, -0.5, 0.0, 0.49, 0.5, 1.5, 2.5, 1e6], np.float32)
    for zp in (np.array(128, np.uint8), np.array(-3, np.int8)):
        graph = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
                                  [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(zp.dtype), [8])],
                                  [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
                                   numpy_helper.from_array(zp, "z")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 10
        import onnxruntime as ort

        (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        np.testing.assert_array_equal(quantize_linear(x, np.array(1.0, np.float32), zp), want)


def test_lookup_qdq_moves_onto_the_table_bit_for_bit():
    model = _embeddings()
    out, modified = _apply(model)
    assert modified
    ops = [n.op_type for n in out.graph.node]
    assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") == 2 and ops.count("Gather") == 2
    tables = {i.name: i for i in out.graph.initializer}
    assert tables["tok_quantized"].data_type == TensorProto.UINT8
    for a, b in zip(_run(model), _run(out), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _apply(out)[1] is False  # idempotent


@pytest.mark.parametrize("case", ["per_channel", "extra_reader", "other_profile"])
def test_left_alone_when_not_exactly_equivalent_or_not_asked(case):
    model = _embeddings(per_channel=case == "per_channel", extra_reader=case == "extra_reader")
    out, modified = _apply(model, get_profile("onnxruntime") if case == "other_profile" else OPENVINO)
    gathers_on_dq = [n for n in out.graph.node if n.op_type == "Gather" and n.input[0].endswith("_dequantized")]
    if case == "other_profile":
        assert not modified and not gathers_on_dq
    else:  # the other lookup (plain per-tensor Q/DQ, no other reader) still moves; this one does not
        moved = {n.input[0] for n in gathers_on_dq}
        assert modified and moved == ({"pos_dequantized"} if case == "extra_reader" else {"tok_dequantized"})
    for a, b in zip(_run(model), _run(out), strict=True):
        np.testing.assert_array_equal(a, b)


class _TokPos(torch.nn.Module):
    """Token + position embedding -> Add -> Linear: the shape OpenVINO 2026.4 refused (AddTransformation)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.fc = torch.nn.Embedding(100, 16), torch.nn.Embedding(8, 16), torch.nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.fc(self.tok(ids) + self.pos(positions))


def _export(model: torch.nn.Module, example: dict | tuple, batches: list, path, target: str):
    prepared = qtrim_fx.prepare(model, example)
    qtrim_fx.calibrate(prepared, batches)
    set_blend(prepared, 1.0)
    prepared.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.export_onnx(prepared, example, path, target=target)
    return prepared


def _openvino_vs_onnxruntime(path, feeds: dict[str, np.ndarray]) -> float:
    import onnxruntime as ort
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU")
    got = compiled(feeds)[compiled.outputs[0]]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    return float(10 * np.log10(np.sum(want.astype(np.float64) ** 2) / max(np.sum((got - want) ** 2), 1e-30)))


def test_openvino_compiles_token_plus_position_embeddings(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 8))
    path = tmp_path / "tokpos.onnx"
    _export(_TokPos().eval(), (ids,), [torch.randint(0, 100, (2, 8)) for _ in range(3)], path, "openvino")
    assert check(path, "openvino") == []
    name = onnx.load(path).graph.input[0].name
    assert _openvino_vs_onnxruntime(path, {name: ids.numpy()}) > 30


def test_openvino_compiles_a_bert_file(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    ids = torch.randint(0, 200, (2, 16))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batches = [{"input_ids": torch.randint(0, 200, (2, 16)), "attention_mask": torch.ones_like(ids)} for _ in range(2)]
    path = tmp_path / "bert.onnx"
    _export(BertModel(cfg).eval(), example, batches, path, "openvino")
    assert check(path, "openvino") == []
    names = [i.name for i in onnx.load(path).graph.input]
    feeds = dict(zip(names, (ids.numpy(), np.ones_like(ids.numpy())), strict=False))
    assert _openvino_vs_onnxruntime(path, feeds) > 25


def _htp_or_fail():
    import importlib.util
    import platform
    import sys

    if importlib.util.find_spec("onnxruntime_qnn") is None:
        if sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail("onnxruntime-qnn is part of the dev extra on Linux x86-64: pip install -e '.[dev]'")
        pytest.skip("onnxruntime-qnn runs on Linux x86-64 and Windows arm64 only")


def test_qnn_lookup_reads_an_integer_table_and_loads_on_the_htp(tmp_path):
    """Issue 20: the QNN HTP (default options) cannot finalize Gather(float table) -> Q -> DQ (MEM_ALLOC 1002, every
    BERT/DistilBERT/GPT-2 qnn file); the qnn profile writes DQ(uint8 table) -> Gather -> Q -> DQ, the same values."""
    _htp_or_fail()
    import onnxruntime as ort

    from qtrim_fx.verification.backend_worker import _assignment_info, _qnn_session

    model = _embeddings()
    out, modified = _apply(model, get_profile("qnn"))
    assert modified and _apply(out, get_profile("qnn"))[1] is False  # idempotent
    by_out = {o: n for n in out.graph.node for o in n.output}
    gathers = [n for n in out.graph.node if n.op_type == "Gather"]
    tables = {i.name: i for i in out.graph.initializer}
    for g in gathers:  # DQ(integer table) -> Gather -> Q -> DQ: the lookup runs on codes
        dq = by_out[g.input[0]]
        assert dq.op_type == "DequantizeLinear" and tables[dq.input[0]].data_type == TensorProto.UINT8
    assert [n.op_type for n in out.graph.node].count("QuantizeLinear") == 2
    for a, b in zip(_run(model), _run(out), strict=True):
        np.testing.assert_array_equal(a, b)
    path = tmp_path / "embeddings.qnn.onnx"
    onnx.save(out, path)
    ids = np.array([[0, 7, 49, 3], [1, 1, 2, 30]], np.int64)
    feeds = {"ids": ids, "pids": np.arange(4, dtype=np.int64)[None]}
    for options in ({}, {"soc_model": "60"}):  # strict: CPU fallback disabled
        sess, _ = _qnn_session(ort, str(path), [ids, feeds["pids"]], options)
        assert set(_assignment_info(sess)[1]) == {"QNNExecutionProvider"}
        got = sess.run(None, feeds)[0]
        del sess  # one QNN option set live at a time: another session's options fail this one's runs
        np.testing.assert_allclose(got, _run(out)[0], atol=0.03)


def test_check_names_a_lookup_in_a_float_table_on_qnn():
    model = _embeddings()
    tables = {v.message.split("'")[3] for v in check(model, "qnn") if v.rule == "float_op" and "table" in v.message}
    assert tables == {"tok", "pos"}  # the file the HTP cannot finalize with default options
    assert [v for v in check(_apply(model, get_profile("qnn"))[0], "qnn") if "table" in v.message] == []
