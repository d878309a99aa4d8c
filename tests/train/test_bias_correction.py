"""Bias correction: InsertBiasShiftPass (prepare), calibrate's measurement, FoldBiasShiftPass (lowering).

Structural: one BiasShift per quantized Conv / Linear, none in the lowered graph. Numerical: the corrected
model's mean output error on the calibration data is zero (it is what the correction removes), the exported
file computes the same as the prepared model on ONNX Runtime, and held-out error drops on inputs with a
constant background (the case the correction is for).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.runtime.bias_shift import BIAS_SHIFT_ATTR, BiasShift, bias_shifts
from tests.helpers.qmodels import assert_exact_at_lambda_0, warm_batchnorm


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def _images(n: int, seed: int) -> torch.Tensor:
    """Digit-like inputs: a constant (normalized) background with a few bright strokes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 16, 16)
    for i in range(n):
        r, c = torch.randint(2, 10, (2,), generator=g).tolist()
        x[i, 0, r:r + 5, c:c + 2] = 1.0
        x[i, 0, r + 2, c:c + 5] = torch.rand((), generator=g) + 0.5
    return (x - 0.13) / 0.31


def _calibrated(bias_correction: bool | None = None, config: qtrim_fx.QuantConfig | None = None, seed: int = 0):
    model = _net(seed)
    batches = [_images(32, 100 + i) for i in range(4)]
    warm_batchnorm(model, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model.eval(), config=config)
        qtrim_fx.calibrate(qm, batches, bias_correction=bias_correction)
    return model, qm.eval(), batches


def test_prepare_gives_each_quantized_conv_and_linear_a_bias_shift():
    qm = qtrim_fx.prepare(_net().eval())
    shifts = bias_shifts(qm)
    assert {k: m.delta.numel() for k, m in shifts.items()} == {"0_weight": 8, "3_weight": 16, "5_weight": 16,
                                                                 "10_weight": 10}
    assert {m.axis for k, m in shifts.items() if k != "10_weight"} == {1} and shifts["10_weight"].axis == -1
    layers = [n for n in qm.graph.nodes if n.op == "call_function" and n.target in (torch.conv2d, torch._C._nn.linear)]
    for layer in layers:
        bias = layer.args[2]
        assert bias.op == "call_module" and str(bias.target).startswith(BIAS_SHIFT_ATTR + ".")
    assert not any(m.active for m in shifts.values())


def test_untouched_shift_is_exact_and_lowering_restores_the_plain_graph():
    model, qm, _ = _calibrated()  # corrected: λ = 0 is still the float model, values and gradients
    assert_exact_at_lambda_0(model, qm, _images(8, 1))
    _, qm, _ = _calibrated(bias_correction=False)
    assert not any(m.active for m in bias_shifts(qm).values())
    low = qtrim_fx.lower(qm)
    assert not hasattr(low, BIAS_SHIFT_ATTR)
    assert not any(BIAS_SHIFT_ATTR in str(n.target) for n in low.graph.nodes)
    convs = [n for n in low.graph.nodes if n.op == "call_function" and n.target is torch.conv2d]
    # conv 3 keeps its own bias parameter; the BN-folded convs read the folded bias
    assert all(n.args[2] is not None and n.args[2].op == "get_attr" for n in convs)
    assert not any("qtrim_shifted" in str(n.target) for n in low.graph.nodes)


def test_corrected_model_has_no_mean_error_on_the_calibration_data():
    model, qm, batches = _calibrated()
    shifts = bias_shifts(qm)
    assert all(m.active for m in shifts.values())
    qtrim_fx.set_blend(qm, 1.0)
    with torch.no_grad():
        err = torch.cat([qm(b) - model(b) for b in batches]).double()
        qtrim_fx.set_blend(qm, 0.0)
        assert all(torch.equal(qm(b), model(b)) for b in batches)  # λ = 0 is still the float model
    # The last layer's correction is (up to the logits' own rounding on the output grid and the running estimate of
    # the layers before, refined batch by batch) the mean logit error itself: little is left of it.
    _, plain, _ = _calibrated(bias_correction=False)
    qtrim_fx.set_blend(plain, 1.0)
    with torch.no_grad():
        plain_err = torch.cat([plain(b) - model(b) for b in batches]).double()
    assert err.mean(0).abs().max() < 0.02 * plain_err.mean(0).abs().max()


def test_correction_lowers_into_the_biases_and_onnx_runtime_agrees(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, qm, _ = _calibrated()
    _, plain, _ = _calibrated(bias_correction=False)
    held_out = _images(64, 7)
    ref = model(held_out).detach().numpy().astype(np.float64)
    errs = {}
    for name, m in (("corrected", qm), ("plain", plain)):
        path = tmp_path / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qtrim_fx.export_onnx(m, (held_out[:1],), path, input_names=["x"], output_names=["y"])
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": held_out.numpy()})[0].astype(np.float64)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        exact = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        qdq = exact.run(None, {"x": held_out.numpy()})[0].astype(np.float64)
        with torch.no_grad():
            torch_got = qtrim_fx.lower(m)(held_out).numpy().astype(np.float64)
        # the file's QDQ semantics (no fusions) are the lowered model, the corrected biases included; ONNX Runtime's
        # fused integer kernels requantize in fixed point and flip rounding boundaries by one step, and on these
        # images one repeated background value on a boundary flips many elements together (RESULTS.md, session 36)
        assert np.abs(qdq - torch_got).max() <= 1e-5 * np.abs(ref).max()
        errs[name] = float(((got - ref) ** 2).mean())
    lowered = qtrim_fx.lower(qm)
    assert any("qtrim_shifted" in str(n.target) for n in lowered.graph.nodes)
    # held-out images, not the calibration set (pooled calibration tails clip less than per-batch ones did, so
    # less bias is left to correct: 0.8x here, 0.5x with the per-batch means)
    assert errs["corrected"] < 0.9 * errs["plain"], errs


def test_checkpoint_restores_the_correction_into_a_fresh_prepare():
    _, qm, batches = _calibrated()
    state = qm.state_dict()
    fresh = qtrim_fx.prepare(_net(0).eval())
    fresh.load_state_dict(state)
    assert all(m.active for m in bias_shifts(fresh).values())
    qtrim_fx.set_blend(qm, 1.0)
    qtrim_fx.set_blend(fresh, 1.0)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(batches[0]), qm(batches[0]))


def test_recalibration_replaces_and_can_remove_the_correction():
    _, qm, batches = _calibrated()
    first = {k: m.delta.clone() for k, m in bias_shifts(qm).items()}
    qtrim_fx.calibrate(qm, batches)
    assert all(torch.allclose(first[k], m.delta, rtol=1e-5, atol=1e-7) for k, m in bias_shifts(qm).items())
    qtrim_fx.calibrate(qm, batches, bias_correction=False)
    assert not any(m.active or m.delta.any() for m in bias_shifts(qm).values())


def test_paper_config_does_not_correct_and_bad_values_are_refused():
    _, qm, _ = _calibrated(config=qtrim_fx.QuantConfig.paper())
    assert not any(m.active for m in bias_shifts(qm).values())
    with pytest.raises(qtrim_fx.SchemeError, match="bias_correction"):
        qtrim_fx.QuantConfig(bias_correction="yes")
    qm2 = qtrim_fx.prepare(_net().eval())
    with pytest.raises(qtrim_fx.ConfigError, match="bias_correction"):
        qtrim_fx.calibrate(qm2, [_images(4, 0)], bias_correction=1)


def test_generator_batches_are_read_once():
    _, qm, batches = _calibrated(bias_correction=False)
    qtrim_fx.calibrate(qm, (b for b in batches))
    assert all(m.active for m in bias_shifts(qm).values())


def test_bias_shift_forward_uses_lambda():
    from qtrim_fx.runtime.blend import BlendControl

    ctl = BlendControl(0.5)
    m = BiasShift(3, 1, ctl)
    b = torch.tensor([1.0, 2.0, 3.0])
    assert m(b) is b  # never set
    m.set_delta(torch.tensor([2.0, 0.0, -2.0]))
    assert torch.equal(m(b), torch.tensor([0.0, 2.0, 4.0]))
    assert torch.equal(m(None), torch.tensor([-1.0, -0.0, 1.0]))
    ctl.set(0.0)
    assert m(b) is b
    # A buffer written in place by another route (a DDP broadcast, load_state_dict) is seen at the next call.
    ctl.set(1.0)
    m.set_delta(None)
    assert m(b) is b
    with torch.no_grad():
        m.delta.copy_(torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(m(b), torch.tensor([0.0, 1.0, 2.0]))
    m.delta = torch.zeros(3)  # .to() / a new tensor
    assert m(b) is b


def test_shift_before_a_training_batchnorm_is_left_out():
    """Batch statistics cancel a per-channel constant: training skips it, eval mode and the file keep it."""
    _, qm, _ = _calibrated()
    shifts = bias_shifts(qm)
    qtrim_fx.set_blend(qm, 1.0)
    before_bn, head = shifts["0_weight"], shifts["10_weight"]
    qm.train()
    assert before_bn(None) is None
    assert torch.equal(head(qm.get_parameter("10.bias")), qm.get_parameter("10.bias") - head.delta)
    qm.eval()
    assert torch.equal(before_bn(None), -before_bn.delta)
    qm.train()  # frozen BatchNorms (eval) during training do not cancel it: it applies
    for m in qm.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    assert torch.equal(before_bn(None), -before_bn.delta)


class _Unbatched(nn.Module):
    """A conv called on (C, H, W) inputs (no batch axis): its output's channel axis is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)

    def forward(self, x):
        return self.conv(x).relu().mean((1, 2))


def test_unbatched_convolution_is_corrected_along_its_channel_axis():
    torch.manual_seed(0)
    model = _Unbatched().eval()
    x = torch.rand(3, 8, 8)
    x[:, :4] = 0.2  # a constant region: a coherent rounding error
    qm = qtrim_fx.prepare(model, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.calibrate(qm, [x, x.flip(1)])
    (shift,) = bias_shifts(qm).values()
    assert shift.active and shift.delta.shape == (5,)


def test_checkpoint_from_before_bias_correction_loads_and_a_corrupted_one_is_refused():
    _, qm, _ = _calibrated()
    old = {k: v for k, v in qm.state_dict().items() if not k.startswith(BIAS_SHIFT_ATTR + ".")}
    fresh = qtrim_fx.prepare(_net(0).eval())
    fresh.load_state_dict(old)  # strict: a checkpoint saved before bias correction existed holds none
    assert not any(m.active for m in bias_shifts(fresh).values())
    bad = qm.state_dict()
    bad[f"{BIAS_SHIFT_ATTR}.0_weight.delta"][0] = float("nan")
    with pytest.raises(qtrim_fx.CheckpointError, match="bias correction"):
        fresh.load_state_dict(bad)


def test_a_loader_is_read_again_and_an_iterator_is_kept():
    """A re-iterable (list, DataLoader) is iterated twice; a generator once (its batches kept); same correction."""
    _, qm, batches = _calibrated(bias_correction=False)
    reads = []

    class Loader:
        def __iter__(self):
            reads.append(1)
            return iter(batches)

    qtrim_fx.calibrate(qm, Loader())
    assert len(reads) == 2
    from_loader = {k: m.delta.clone() for k, m in bias_shifts(qm).items()}
    qtrim_fx.calibrate(qm, (b for b in batches))
    assert all(torch.equal(from_loader[k], m.delta) for k, m in bias_shifts(qm).items())
    qtrim_fx.calibrate(qm, Loader(), num_batches=2)  # the second pass stops where the first did
    two = {k: m.delta.clone() for k, m in bias_shifts(qm).items()}
    qtrim_fx.calibrate(qm, batches[:2])
    assert all(torch.equal(two[k], m.delta) for k, m in bias_shifts(qm).items())


def test_empty_batches_are_skipped_in_both_passes():
    _, qm, batches = _calibrated(bias_correction=False)
    with pytest.warns(UserWarning, match="skipped an empty batch") as caught:
        qtrim_fx.calibrate(qm, [batches[0], batches[0][:0], batches[1]])
    assert all(w.filename == __file__ for w in caught if "empty batch" in str(w.message))
    assert sum("empty batch" in str(w.message) for w in caught) == 1
    assert all(m.active for m in bias_shifts(qm).values())


class _Conv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D: ``addmm(bias, x, weight)`` with the weight stored (in, out)."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)  # noqa: RUF005 (as Hugging Face writes it: traceable)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class _GPTMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj = _Conv1D(8, 16), _Conv1D(16, 8)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_fc(x)))


def test_addmm_layers_are_corrected_and_export_with_the_corrected_bias(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _GPTMlp().eval()
    batches = [torch.randn(4, 6, 8).clamp(min=-0.5) for _ in range(4)]  # a floor value repeated: a mean error
    qm = qtrim_fx.prepare(model, (batches[0],))
    shifts = bias_shifts(qm)
    assert {k: (m.delta.numel(), m.axis) for k, m in shifts.items()} == {"c_fc_weight": (16, -1),
                                                                       "c_proj_weight": (8, -1)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.calibrate(qm, batches)
        assert all(m.active for m in shifts.values())
        path = tmp_path / "mlp.onnx"
        qtrim_fx.export_onnx(qm, (batches[0],), path, input_names=["x"], output_names=["y"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        lowered = qtrim_fx.lower(qm)(batches[1]).numpy()
    got = sess.run(None, {"x": batches[1].numpy()})[0]
    assert np.abs(got - lowered).max() <= 0.01 * np.abs(lowered).max()


def test_inspect_notes_the_corrected_layers():
    _, qm, batches = _calibrated()
    rows = {r.name: r for r in qtrim_fx.inspect(qm).rows}
    assert all(any(n.startswith("bias corrected: max |δ|") for n in rows[k].notes)
               for k in ("0.weight", "3.weight", "5.weight", "10.weight"))
    assert not any("bias corrected" in n for r in rows.values() if r.kind == "activation" for n in r.notes)
    qtrim_fx.calibrate(qm, batches, bias_correction=False)
    assert "bias corrected" not in str(qtrim_fx.inspect(qm))


class _ComputedBias(nn.Module):
    """A layer whose bias is computed in the graph (not a parameter the lowering can replace)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8) * 0.3)
        self.b = nn.Parameter(torch.randn(6) * 0.1)

    def forward(self, x):
        return torch.nn.functional.linear(torch.relu(x), self.w, self.b * 2.0)


def test_a_computed_bias_is_corrected_in_the_lowered_graph():
    torch.manual_seed(0)
    model = _ComputedBias().eval()
    batches = [torch.randn(16, 8) for _ in range(3)]
    qm = qtrim_fx.prepare(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qtrim_fx.calibrate(qm, batches)
        (shift,) = bias_shifts(qm).values()
        assert shift.active
        low = qtrim_fx.lower(qm)  # at λ = 0, as right after calibrate (the PTQ flow): fully quantized, corrected
    assert not any(BIAS_SHIFT_ATTR in str(n.target) for n in low.graph.nodes)
    qtrim_fx.set_blend(qm, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(low(batches[0]), qm.eval()(batches[0]), rtol=0, atol=1e-6)
