"""Hugging Face models through the torch.export front end keep dynamic batch *and* sequence dims in ONNX.

Exported once at batch 2, sequence 16 (dict inputs, as ``prepare`` takes them), the file must run in
ONNX Runtime at other batch sizes and lengths and equal the prepared model at λ = 1 within rounding.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import qtrim_fx

transformers = pytest.importorskip("transformers")

SHAPES = [(1, 8), (3, 33), (7, 8), (7, 33)]


def _bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))


def _distilbert():
    return transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64))


def _gpt2():
    return transformers.GPT2Model(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2,
                                                          n_positions=64, use_cache=False))


def _t5_encoder():
    return transformers.T5EncoderModel(transformers.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64,
                                                             num_layers=2, num_heads=2))


def _batch(b: int, s: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s // 2:] = 0  # one padded row: the mask path is exercised too
    return {"input_ids": torch.randint(0, 100, (b, s), generator=g), "attention_mask": mask}


@pytest.mark.parametrize("factory", [_bert, pytest.param(_distilbert, marks=pytest.mark.slow),
                                     pytest.param(_gpt2, marks=pytest.mark.slow),
                                     pytest.param(_t5_encoder, marks=pytest.mark.slow)])
def test_hf_export_runs_at_other_batch_and_sequence(tmp_path, factory):
    torch.manual_seed(0)
    model = factory().eval()
    qm = qtrim_fx.prepare(model, example_inputs=_batch(2, 16, 0))
    assert qtrim_fx.inspect(qm).frontend == "torch.export"
    qtrim_fx.calibrate(qm, [_batch(2, 16, i) for i in range(3)])
    qtrim_fx.set_blend(qm, 1.0)
    qm.eval()
    path = tmp_path / "hf.onnx"
    qtrim_fx.export_onnx(qm, _batch(2, 16, 0), path)  # exporter="auto": dynamo for a torch.export capture
    # Values are checked against the file's QDQ semantics (no graph optimizations, as export's self-check); the
    # default session's fused integer kernels must run at every shape too, but they requantize in fixed point and
    # a random-init transformer amplifies their rounding flips (RESULTS, "ONNX Runtime's default optimizations").
    fused = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert [i.shape for i in sess.get_inputs()] == [["batch", "sequence"]] * 2
    for b, s in SHAPES:
        x = _batch(b, s, 7)
        assert fused.run(None, {k: v.numpy() for k, v in x.items()})[0].shape == (b, s, 32)
        out = sess.run(None, {k: v.numpy() for k, v in x.items()})[0]
        with torch.no_grad():
            ref = qm(**x)[0].numpy()
        assert out.shape == ref.shape == (b, s, 32)
        rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
        err = np.abs(out.astype(np.float64) - ref)
        # within rounding: float-order differences, at most a rare one-step flip of a quantized tensor
        assert err.max() <= 0.02 * rms and err.mean() <= 1e-4 * rms, (b, s, err.max(), err.mean(), rms)
