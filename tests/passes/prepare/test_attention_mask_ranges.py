"""An additive attention mask does not set the grid of the scores it hides (integer-only targets).

Regression: with a padding mask in the calibration batches (``finfo.min``, ``-inf`` or ``-1e4`` added to the
scores of padded keys, as Hugging Face eager attention does), the scores-plus-mask site of a ``qnn`` / ``npu``
model took the range [-3.4e38, max]: scale ~1e36, every real score on one code, the attention an average of the
values — in training, in the lowered model and in the file, with no error; an ``-inf`` mask was excluded as
non-finite and its grid hid nothing. The observer of a softmax input now sees masked entries at the bound a grid
must reach, and the mask operand's at 104 below its row's max (``masked_scores_bound``): a scale integer kernels
can rescale (``finfo.min``'s, ~1e36, made ONNX Runtime's fused QLinearAdd return garbage).
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qtrim_fx
from qtrim_fx.runtime.observer import masked_scores_bound
from tests.helpers.cpu import ort_cpu_session


class MaskedAttention(nn.Module):
    """Single-head attention with an additive mask built from a 0/1 padding mask, no residual."""

    def __init__(self, dim: int = 32, fill: float = torch.finfo(torch.float32).min, arithmetic: bool = False) -> None:
        super().__init__()
        self.arithmetic = arithmetic  # ``(1 - keep) * fill``, as older BERT code writes its mask
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.fill = fill
        self.scale = 1.0 / math.sqrt(dim)
        with torch.no_grad():  # scores spanning a few units, as in a trained model
            self.q.weight.mul_(4.0)
            self.k.weight.mul_(4.0)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.arithmetic:
            add = (1.0 - keep[:, None, :]) * self.fill
        else:
            add = torch.where(keep[:, None, :] > 0, 0.0, self.fill)
        s = torch.matmul(self.q(x), self.k(x).transpose(-2, -1)) * self.scale
        p = torch.softmax(s + add, dim=-1)
        return torch.matmul(p, self.v(x))


#: a usable grid here: the real tensors' widest span (the raw scores, ~±160) is ~300 over 255 steps; a grid set by a
#: masking value (-1e4, finfo.min) is orders of magnitude wider
SCALE_BOUND = 4.0


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 12, 32, generator=g)
    keep = torch.ones(4, 12)
    keep[1, 7:] = 0
    keep[3, 4:] = 0
    return x, keep


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp_min(1e-30)))


@pytest.mark.parametrize("fill,arithmetic", [(torch.finfo(torch.float32).min, False), (float("-inf"), False),
                                             (-1e4, False), (-1e4, True), (-1e9, True)])
@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_padding_mask_keeps_the_scores_grid(target: str, fill: float, arithmetic: bool) -> None:
    torch.manual_seed(0)
    model = MaskedAttention(fill=fill, arithmetic=arithmetic).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, _batch(0), target=target)
        qtrim_fx.calibrate(qm, [_batch(s) for s in range(1, 5)])
    qtrim_fx.set_blend(qm, 1.0)
    qm.eval()
    x, keep = _batch(9)
    with torch.no_grad():
        ref = model(x, keep)
        deployed = qtrim_fx.lower(qm, target)(x, keep)
    # every site's grid is a usable one (the bug: scale ~1e36 on the scores-plus-mask site); the raw scores of
    # this net span about ±160 over the calibration set (scale ~1.15 on uint8)
    for spec, site, _ in qtrim_fx.iter_sites(qm):
        scale, _ = site.qparams()
        assert float(scale.max()) < SCALE_BOUND or spec.kind == "weight", (spec.key, scale)
    # HEAD before the fix: ~4 dB (uniform attention); 24.4 dB with the calibration set's pooled tails (26.7 with the
    # mean of these 4 small batches' tails, which clipped the raw scores' extremes a little)
    assert _sqnr(ref, deployed) > 20.0
    assert torch.isfinite(deployed).all()


def test_padding_mask_file_on_onnx_runtime(tmp_path) -> None:
    """The ``qnn`` file itself, run by ONNX Runtime, tracks the float model on padded batches."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, _batch(0), target="qnn")
        qtrim_fx.calibrate(qm, [_batch(s) for s in range(1, 5)])
        qtrim_fx.set_blend(qm, 1.0)
        path = tmp_path / "m.onnx"
        qtrim_fx.export_onnx(qm.eval(), _batch(0), path, target="qnn")
    # only the mask's construction from the float 0/1 input (Unsqueeze, Greater) is left in float
    assert all("Softmax" not in v.node and "MatMul" not in v.node for v in qtrim_fx.onnx.check(path, "qnn"))
    x, keep = _batch(9)
    sess = ort_cpu_session(path)
    feeds = dict(zip([i.name for i in sess.get_inputs()], [x.numpy(), keep.numpy()], strict=True))
    out = torch.from_numpy(sess.run(None, feeds)[0])
    with torch.no_grad():
        assert _sqnr(model(x, keep), out) > 20.0  # 24.4 dB, as the lowered model (before the fix: ~4 dB)


def test_masked_scores_bound_values() -> None:
    x = torch.tensor([[1.0, 2.0, -3.4e38, float("-inf")], [0.5, -1e4, 0.0, 1.0],
                      [-3.4e38, -3.4e38, -3.4e38, -3.4e38]])
    y = masked_scores_bound(x, -1, 8)
    bound = 9 * math.log(2.0) + math.log(4.0)
    np.testing.assert_allclose(y[0].tolist(), [1.0, 2.0, 2.0 - bound, 2.0 - bound], rtol=1e-6)
    np.testing.assert_allclose(y[1].tolist(), [0.5, 1.0 - bound, 0.0, 1.0], rtol=1e-6)
    # a fully masked row (its softmax is uniform for any one value) is observed at the tensor's bound
    np.testing.assert_allclose(y[2].tolist(), [2.0 - bound] * 4, rtol=1e-6)
    # a real score further below its row's best than T is observed at the bound too (its weight is below half a
    # step of the probabilities either way); the others as they are
    z = torch.tensor([[10.0, -90.0, 3.0]])
    t = 9 * math.log(2.0) + math.log(3.0)
    np.testing.assert_allclose(masked_scores_bound(z, 1, 8)[0].tolist(), [10.0, 10.0 - t, 3.0], rtol=1e-6)
    # the mask operand (bits=None): only masked entries move, to 104 below their row's max; a bias keeps its values
    m = torch.tensor([[0.5, -2.0, -3.4e38, 1.0]])
    np.testing.assert_allclose(masked_scores_bound(m, 1, None)[0].tolist(), [0.5, -2.0, 1.0 - 104.0, 1.0], rtol=1e-6)


def test_default_target_scores_stay_float() -> None:
    """On targets that keep attention scores in float the mask never meets a grid (unchanged)."""
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, _batch(0))
    assert all(site.observer.softmax_dim is None for _, site, _ in qtrim_fx.iter_sites(qm))


@pytest.mark.parametrize("lam", [0.3, 0.7])
@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min])
def test_training_between_the_ends_stays_finite(lam: float, fill: float) -> None:
    """``lerp(-inf, lo, λ)`` is NaN for λ < 1/2: a masked entry blends to -inf (masked) until λ = 1."""
    torch.manual_seed(0)
    model = MaskedAttention(fill=fill)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, _batch(0), target="qnn")
        qtrim_fx.calibrate(qm, [_batch(s) for s in range(1, 3)])
    qtrim_fx.set_blend(qm, lam)
    qm.train()
    x, keep = _batch(5)
    keep[2] = 0  # a sample whose every key is masked: each row -inf (or finfo.min) throughout
    out = qm(x, keep)
    out.sum().backward()
    rows = [0, 1, 3] if fill == float("-inf") else [0, 1, 2, 3]  # softmax over all -inf is NaN in torch too
    assert torch.isfinite(out[rows]).all()
    with torch.no_grad():
        assert _sqnr(model(x[rows], keep[rows]), out[rows].detach()) > 20.0
    if fill != float("-inf"):
        assert all(torch.isfinite(p.grad).all() for p in qm.parameters() if p.grad is not None)


def test_bool_mask_attention_with_a_fully_masked_row_trains_at_every_blend() -> None:
    """sdpa with a bool mask, written out for qnn (``_safe_softmax``): a row with no key gives 0, never NaN."""
    import torch.nn.functional as F

    class BoolMaskAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x, keep):
            n, t, _ = x.shape
            q, k, v = self.qkv(x).view(n, t, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :] > 0)

    torch.manual_seed(0)
    model = BoolMaskAttention()
    x = torch.randn(3, 6, 16)
    keep = torch.ones(3, 6)
    keep[1, 3:] = 0
    keep[2] = 0  # sample 2 sees no key: torch's attention gives 0 there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, (x, keep), target="qnn")
        qtrim_fx.calibrate(qm, [(x, keep), (torch.randn(3, 6, 16), keep)])
    for lam in (0.0, 0.3, 0.7, 1.0):
        qtrim_fx.set_blend(qm, lam)
        qm.train()
        qm.zero_grad()
        out = qm(x, keep)
        out.sum().backward()
        assert torch.isfinite(out).all(), lam
        assert all(torch.isfinite(p.grad).all() for p in qm.parameters() if p.grad is not None), lam
        if lam < 1.0:
            assert torch.equal(out[2], torch.zeros_like(out[2]))  # masked entirely: 0, as torch gives


def test_logits_that_a_softmax_reads_are_observed_as_they_are() -> None:
    """A model output is never clipped: rows of very different offsets (confident logits) are not 'masked'."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            z = self.fc(x)
            return z, torch.softmax(z, -1)

    x = torch.randn(4, 8)
    head = Head().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(copy.deepcopy(head), (x,), target="qnn")
    x[0] *= 1000.0  # one sample's logits ~1000x the others': its row max is far above theirs
    qtrim_fx.calibrate(qm, [(x,)])
    # the model's outputs: logits (read by the softmax too) and the probabilities, both unclipped
    outs = [site for spec, site, _ in qtrim_fx.iter_sites(qm) if spec.kind != "weight" and not site.observer.clip]
    assert len(outs) == 2 and all(site.observer.softmax_dim is None for site in outs)
    with torch.no_grad():
        z = head(x)[0]
    # every output range holds the float logits of every row (the far-below rows are not observed elsewhere)
    assert any(float(site.observer.lo) <= float(z.min()) and float(site.observer.hi) >= float(z.max())
               for site in outs)
    assert float(z[1:].abs().max()) < float(z[0].abs().max()) - 104.0  # the rows the masked-row rule would move


class BiasedMaskedAttention(MaskedAttention):
    """T5's form: ``scores + (position_bias + mask)``, the mask added to a learned bias first."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(12, 12))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        mask = (1.0 - keep[:, None, :]) * torch.finfo(torch.float32).min  # as T5 builds it: a Mul, a site of its own
        bias = self.bias + mask
        s = torch.matmul(self.q(x), self.k(x).transpose(-2, -1)) * self.scale
        return torch.matmul(torch.softmax(s + bias, dim=-1), self.v(x))


@pytest.mark.parametrize("target", ["qnn", "npu"])
def test_a_mask_added_to_a_bias_first_keeps_every_grid(target: str) -> None:
    torch.manual_seed(0)
    model = BiasedMaskedAttention().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, _batch(0), target=target)
        qtrim_fx.calibrate(qm, [_batch(s) for s in range(1, 5)])
    qtrim_fx.set_blend(qm, 1.0)
    for spec, site, _ in qtrim_fx.iter_sites(qm):
        assert float(site.qparams()[0].max()) < SCALE_BOUND, spec.key  # before: the mask's site at scale ~1e36
    x, keep = _batch(9)
    with torch.no_grad():
        assert _sqnr(model(x, keep), qtrim_fx.lower(qm.eval(), target)(x, keep)) > 20.0


def test_compiled_training_masks_like_eager_at_both_blends() -> None:
    """Under ``torch.compile`` (λ a tensor, no host mirror) a masked entry is -inf below λ = 1, the grid's bound at 1."""
    torch.manual_seed(0)
    model = MaskedAttention(fill=float("-inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model, _batch(0), target="qnn")
        qtrim_fx.calibrate(qm, [_batch(1)])
    compiled = torch.compile(qm)
    x, keep = _batch(2)
    for lam in (0.4, 1.0):
        qtrim_fx.set_blend(qm, lam)
        qm.train()
        eager = qm(x, keep)
        out = compiled(x, keep)
        assert torch.isfinite(out).all(), lam
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
