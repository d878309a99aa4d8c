"""GPT-2 for the QNN HTP (issue 20): the lowered model runs, the file loads strictly with no CPU node and matches it.

Before: lowering put a ``quant_dequant`` on the tuple of ``aten.split.Tensor`` (q/k/v) and export failed
(``'list' object has no attribute 'dtype'``); the Conv1D ``addmm -> view -> site`` left the Gemm in float; the ``x ** 3`` of GPT-2's own ``gelu_new`` had no
site, and its float ``Pow -> Mul`` island failed the HTP's finalize.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch

import qtrim_fx
from tests.helpers.htp import require_htp


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 128, (1, 8), generator=g)}




def test_gpt2_qnn_file_loads_strictly_on_the_htp_and_matches_lowering(tmp_path):
    transformers = pytest.importorskip("transformers")
    require_htp()
    import onnxruntime as ort

    from qtrim_fx.verification.backend_worker import _assignment_info, _qnn_session

    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=16, use_cache=False, bos_token_id=0,
        eos_token_id=0, attn_implementation="eager",
        # GPT-2's own "gelu_new" is x**3 & co. in Python: before the pow had its own site, the float
        # Pow -> Mul(0.044715) island failed the HTP's finalize at this size (MEM_ALLOC 1002, issue 20)
        activation_function="gelu_new")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, _batch(0), target="qnn")
        qtrim_fx.calibrate(qm, [_batch(s) for s in range(1, 4)])
        qtrim_fx.set_blend(qm, 1.0)
        qm.eval()
        path = tmp_path / "gpt2.qnn.onnx"
        qtrim_fx.export_onnx(qm, _batch(0), path, target="qnn", exporter="torchscript")
    graph = onnx.load(path).graph
    nodes = {n.name: n.op_type for n in graph.node}
    producers = {o: n.op_type for n in graph.node for o in n.output}
    pows = [n for n in graph.node if n.op_type == "Pow"]
    assert pows and all(producers.get(i) == "DequantizeLinear" for n in pows for i in n.input)  # exponent too
    floats = [nodes.get(v.node) for v in qtrim_fx.onnx.check(path, "qnn") if v.rule == "float_op"]
    assert set(floats) <= {"Gather", "Cast"}, floats  # the mask arithmetic only (warnings)
    test = _batch(9)
    with torch.no_grad():
        ref = qtrim_fx.lower(qm, "qnn")(**test)[0].numpy()
    ids = test["input_ids"].numpy()
    sess, _ = _qnn_session(ort, str(path), [ids], {})  # default options, strict (CPU fallback disabled)
    assert set(_assignment_info(sess)[1]) == {"QNNExecutionProvider"}
    out = sess.run(None, {"input_ids": ids})[0].astype(np.float64)
    sqnr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((out - ref) ** 2))
    assert sqnr >= 30, sqnr


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_default_sdpa_attention_runs_on_the_htp_with_no_float_op(tmp_path, name):
    """Hugging Face's default attention (``sdpa``: a bool mask for BERT, causal for GPT-2, dropout in training only).

    Before: left as one SDPA op, the file kept 12 float ops (6 check errors: the score MatMuls, Mul, Add, Softmax)
    and the HTP could not finalize it (``QNN_COMMON_ERROR_MEM_ALLOC``, 1002). Now written out at prepare with torch's
    own additive mask and ``_safe_softmax`` (``DecomposeAttentionPass``): no violation, strict, no CPU node.
    """
    transformers = pytest.importorskip("transformers")
    require_htp()
    import onnxruntime as ort

    from qtrim_fx.verification.backend_worker import _assignment_info, _qnn_session

    torch.manual_seed(0)
    if name == "bert":
        model = transformers.BertModel(transformers.BertConfig(
            vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16)).eval()
    else:
        model = transformers.GPT2Model(transformers.GPT2Config(
            vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=16, use_cache=False, bos_token_id=0,
            eos_token_id=0)).eval()
    assert model.config._attn_implementation == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, _batch(0), target="qnn")
        qtrim_fx.calibrate(qm, [_batch(s) for s in range(1, 4)])
        qtrim_fx.set_blend(qm, 1.0)
        qm.eval()
        path = tmp_path / f"{name}.qnn.onnx"
        qtrim_fx.export_onnx(qm, _batch(0), path, target="qnn")
    assert qtrim_fx.onnx.check(path, "qnn") == []
    test = _batch(9)
    with torch.no_grad():
        ref = qtrim_fx.lower(qm, "qnn")(**test)[0].numpy().astype(np.float64)
    ids = test["input_ids"].numpy()
    sess, _ = _qnn_session(ort, str(path), [ids], {})  # default options, strict (CPU fallback disabled)
    assert set(_assignment_info(sess)[1]) == {"QNNExecutionProvider"}
    out = sess.run(None, {"input_ids": ids})[0].astype(np.float64)
    assert 10 * np.log10(np.sum(ref**2) / np.sum((out - ref) ** 2)) >= 30
