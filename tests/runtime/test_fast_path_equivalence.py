"""The eager fast paths of blend-quant give the reference path's values and gradients (issue 22).

- activation sites hand :class:`BlendQuantFn` the clipped-STE bounds cached with their qparams:
  the same bits, forward and backward, as bounds computed per call, and as the plain formulas
  ``lerp(x, x̂, λ)`` / ``g·((1 − λ) + λ·1[lo < x̃ < hi])``;
- BN-folded weight sites carry the identity gradient in an autograd ``clone`` (no Python backward):
  the same bits as :class:`_BlendFoldedFn`, the gradient is the incoming one unchanged;
- the cached bounds follow the statistics (an observer update refreshes them).

Per tensor and per channel, λ ∈ {0, 0.3, 1}.
"""

from __future__ import annotations

import pytest
import torch

from qtrim_fx.core.fakequant import channel_view, fake_quantize_broadcast
from qtrim_fx.core.scheme import QuantScheme
from qtrim_fx.runtime.blend import (
    BlendControl,
    BlendQuantFn,
    _BlendFoldedFn,
    blend_quant_folded,
    fold_product,
    host_bounds,
)
from qtrim_fx.runtime.observer import EmaQuantileObserver
from qtrim_fx.runtime.ops import relu_keep_mask
from qtrim_fx.runtime.site import QuantSite

LAMS = [0.0, 0.3, 1.0]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _activation(per_channel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x across and beyond an asymmetric uint8 grid (saturated ends, exact grid points, ±0.0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=g) * 2.0
    scale = torch.tensor([0.011, 0.023, 0.017]) if per_channel else torch.tensor(0.013)
    zp = torch.tensor([100.0, 30.0, 200.0]) if per_channel else torch.tensor(77.0)
    s, z = channel_view(scale, 4, 1), channel_view(zp, 4, 1)
    x[0, :, 0, :3] = torch.tensor([-0.0, 0.0, -1e-9])
    x[1, :, 1, :2] = torch.stack([(0 - z) * s, (255 - z) * s]).reshape(2, -1).T if per_channel else \
        torch.stack([(0 - z) * s, (255 - z) * s])
    return x, s, z


def _reference(x, s, z, lam):
    """The plain formulas: value lerp(x, x̂, λ), gradient (1 − λ) + λ·1[lo < x̃ < hi] per element."""
    xq = fake_quantize_broadcast(x, s, z, 0, 255)
    out = torch.lerp(x, xq, torch.tensor(lam))
    lo, hi = (0 - z) * s, (255 - z) * s
    inside = ((out > lo) & (out < hi)).float()
    return out, (1.0 - lam) + lam * inside


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("lam", LAMS)
def test_cached_bounds_give_the_reference_values_and_gradients(per_channel, lam):
    x0, s, z = _activation(per_channel)
    g = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    bounds = host_bounds(s, z, 0, 255)
    assert (bounds is None) == per_channel  # per-channel qparams keep the tensor mask
    lam_t = torch.tensor(lam)
    results = []
    for given in (None, bounds):  # per call (the reference path) / cached by the caller (the fast path)
        x = x0.clone().requires_grad_()
        out = BlendQuantFn.apply(x, s, z, lam_t, 0, 255, lam == 1.0, True, True, given)
        (gx,) = torch.autograd.grad(out, x, g)
        results.append((out.detach(), gx))
    (ref_out, ref_g), (fast_out, fast_g) = results
    assert torch.equal(_bits(fast_out), _bits(ref_out))
    assert torch.equal(_bits(fast_g), _bits(ref_g))
    plain_out, factor = _reference(x0, s, z, lam)
    assert torch.equal(_bits(fast_out), _bits(plain_out))
    torch.testing.assert_close(fast_g, g * factor, rtol=1e-6, atol=1e-7)
    if lam == 1.0:
        assert torch.equal(fast_g, g * factor)  # pass or block, nothing blended


def _folded(per_channel: bool):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 4, 3, 3, generator=g)
    f = channel_view(torch.tensor([0.7, 1.3, 0.0, 2.1, 0.9, 1.0]), 4, 0)
    m = (w.detach() * f).abs().amax(dim=(1, 2, 3)) if per_channel else (w.detach() * f).abs().amax()
    scale = torch.clamp(m, min=1e-6) / 127.0
    return w, f, channel_view(scale, 4, 0) if per_channel else scale


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("zero_fold", [False, True])
def test_folded_weight_clone_path_equals_the_function_path(per_channel, lam, zero_fold):
    w0, f, scale = _folded(per_channel)
    if not zero_fold:
        f = torch.where(f == 0, 0.5, f)
    g = torch.randn(w0.shape, generator=torch.Generator().manual_seed(3))
    lam_t = torch.tensor(lam)
    w_ref = w0.clone().requires_grad_()
    ref = _BlendFoldedFn.apply(w_ref, w_ref.detach() * f, f, scale, None, lam_t, -127, 127, lam == 1.0)
    (g_ref,) = torch.autograd.grad(ref, w_ref, g)
    w = w0.clone().requires_grad_()
    wf = fold_product(w, f)
    assert wf.requires_grad and torch.equal(wf, w0 * f)
    out = blend_quant_folded(w, wf, f, scale, None, lam_t, -127, 127, lam == 1.0)
    assert out is wf and type(out.grad_fn).__name__ == "CloneBackward0"  # no Python backward
    (gw,) = torch.autograd.grad(out, w, g)
    assert torch.equal(_bits(out), _bits(ref))
    assert torch.equal(_bits(gw), _bits(g_ref)) and torch.equal(gw, g)  # identity gradient
    if lam == 0.0:
        assert torch.equal(out, w0)


def test_fold_product_without_grad_is_a_plain_product():
    w, f, _ = _folded(True)
    with torch.no_grad():
        p = fold_product(w.requires_grad_(), f)
    assert not p.requires_grad and torch.equal(p, w.detach() * f)
    assert not fold_product(w.detach(), f).requires_grad


@pytest.mark.parametrize("lam", LAMS)
def test_site_bounds_follow_observer_updates(lam):
    control = BlendControl(lam)
    scheme = QuantScheme(bits=8, signed=False, symmetric=False)
    site = QuantSite(scheme, EmaQuantileObserver("range", momentum=0.5), control)
    site.keep_output = True
    site.train()
    g = torch.Generator().manual_seed(4)
    for step in range(3):  # each call updates the statistics: the cached grid must follow
        x = (torch.randn(8, 16, generator=g) * (1 + step)).requires_grad_()
        out = site(x)
        scale, zp, bounds = site._training_grid(x.dim())
        ref_scale, ref_zp = site.qparams()
        assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)
        assert bounds == host_bounds(ref_scale, ref_zp, scheme.qmin, scheme.qmax)
        if lam == 0.0:
            assert out is x
            continue
        ref_out, factor = _reference(x.detach(), ref_scale, ref_zp, lam)
        assert torch.equal(_bits(out), _bits(ref_out))
        (gx,) = torch.autograd.grad(out, x, torch.ones_like(x))
        torch.testing.assert_close(gx, factor, rtol=1e-6, atol=1e-7)


# -- relu_keep_mask read only by sites: the ReLU's mask is skipped where the sites' masks cover it --------


def _relu_site_grads(lam: float, scheme: QuantScheme, clip: bool = True, lean: bool = True, readers: int = 1):
    """(output, input gradient, relu node) of relu -> site(s), relu_keep_mask (lean) or torch.relu."""
    control = BlendControl(lam)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 8, 6, 6, generator=g) * 2).requires_grad_()
    sites = []
    for i in range(readers):
        # The second reader, when present, has a signed symmetric grid (lo < 0): it never covers relu's mask.
        sch = scheme if i == 0 else QuantScheme(bits=8, signed=True, symmetric=True)
        site = QuantSite(sch, EmaQuantileObserver("range", clip=clip, act_range="mse" if not clip else "quantile"),
                         control)
        site.keep_output = True
        site.observer.observe(torch.relu(x.detach()))
        site.train()
        site.observer.enabled = False
        sites.append(site)
    y = relu_keep_mask(x) if lean else torch.relu(x)
    outs = [site(y) for site in sites]
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    (gx,) = torch.autograd.grad(sum((o * up).sum() for o in outs), x)
    return torch.stack([o.detach() for o in outs]), gx, y.grad_fn


UINT8 = QuantScheme(bits=8, signed=False, symmetric=False)


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("case", ["uint8", "signed_symmetric", "unclipped", "two_readers"])
def test_relu_mask_skip_gives_torch_relu_gradients(lam, case):
    scheme = QuantScheme(bits=8, signed=True, symmetric=True) if case == "signed_symmetric" else UINT8
    kw = {"clip": case != "unclipped", "readers": 2 if case == "two_readers" else 1}
    out, gx, node = _relu_site_grads(lam, scheme, **kw)
    ref_out, ref_gx, _ = _relu_site_grads(lam, scheme, lean=False, **kw)
    assert torch.equal(_bits(out), _bits(ref_out))
    assert torch.equal(_bits(gx), _bits(ref_gx))
    skipped = node.reads == node.masked_reads > 0
    assert skipped == (lam == 1.0 and case == "uint8")  # only where every reader's mask covers y <= 0
    assert node.reads == kw["readers"]
