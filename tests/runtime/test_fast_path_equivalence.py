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
    quantize_folded_one,
)
from qtrim_fx.runtime.observer import EmaQuantileObserver
from qtrim_fx.runtime.ops import deferred_relu, is_deferred_relu
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


# -- deferred_relu read only by sites: the ReLU is not computed where the sites' grids cover it --------------


def _graph_types(t: torch.Tensor) -> set[str]:
    """The autograd node types behind ``t``."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        n = todo.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        names.add(type(n).__name__)
        todo.extend(f for f, _ in n.next_functions)
    return names


def _relu_site_grads(lam: float, scheme: QuantScheme, clip: bool = True, lean: bool = True, readers: int = 1,
                     observe: bool = False):
    """(outputs, input gradient, autograd node types, observer ranges) of relu -> site(s), deferred_relu (lean)
    or torch.relu."""
    control = BlendControl(lam)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, 6, 6, generator=g) * 2
    x.view(-1)[:6] = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf"), 1e-40])
    x.requires_grad_()
    sites = []
    for i in range(readers):
        # The second reader, when present, has a signed symmetric grid (lo < 0): it never covers relu's mask.
        sch = scheme if i == 0 else QuantScheme(bits=8, signed=True, symmetric=True)
        site = QuantSite(sch, EmaQuantileObserver("range", clip=clip, act_range="mse" if not clip else "quantile",
                                                  momentum=0.5), control)
        site.keep_output = True
        site.observer.observe(torch.relu(x.detach()).nan_to_num(0.0, 0.0, 0.0))
        site.train()
        site.observer.enabled = observe
        sites.append(site)
    y = deferred_relu(x) if lean else torch.relu(x)
    outs = [site(y) for site in sites]
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    loss = sum((o.nan_to_num(0.0, 0.0, 0.0) * up).sum() for o in outs)
    types = set().union(*(_graph_types(o) for o in outs))
    (gx,) = torch.autograd.grad(loss, x)
    ranges = torch.stack([torch.stack([s.observer.lo, s.observer.hi]) for s in sites])
    return torch.stack([o.detach() for o in outs]), gx, types, ranges


UINT8 = QuantScheme(bits=8, signed=False, symmetric=False)


@pytest.mark.parametrize("observe", [False, True])
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("case", ["uint8", "signed_symmetric", "unclipped", "two_readers"])
def test_deferred_relu_gives_torch_relu_values_gradients_and_statistics(lam, case, observe):
    """Sites reading a deferred relu: the bits of relu -> site (values incl. NaN, ±0, ±inf; gradients; observer
    ranges after an update on the relu's output), and no relu computed only where every reader's grid covers it."""
    scheme = QuantScheme(bits=8, signed=True, symmetric=True) if case == "signed_symmetric" else UINT8
    kw = {"clip": case != "unclipped", "readers": 2 if case == "two_readers" else 1, "observe": observe}
    out, gx, types, ranges = _relu_site_grads(lam, scheme, **kw)
    ref_out, ref_gx, _, ref_ranges = _relu_site_grads(lam, scheme, lean=False, **kw)
    assert torch.equal(_bits(out), _bits(ref_out))
    assert torch.equal(_bits(gx), _bits(ref_gx))
    assert torch.equal(ranges, ref_ranges)
    relu_computed = "_ReluKeepMaskFnBackward" in types
    # Computed unless λ = 1 on a grid starting at 0 with the clipped mask (lam = 0 returns relu's own output).
    assert relu_computed == (not (lam == 1.0 and case == "uint8"))


def test_deferred_relu_without_autograd_is_relu():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(deferred_relu(x), torch.relu(x))
    with torch.no_grad():
        xr = x.clone().requires_grad_()
        assert torch.equal(deferred_relu(xr), torch.relu(x))
    assert is_deferred_relu(deferred_relu(x.clone().requires_grad_()))


def test_deferred_relu_read_by_a_disabled_site_is_relu():
    control = BlendControl(1.0)
    site = QuantSite(UINT8, EmaQuantileObserver("range"), control)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    site.observer.observe(torch.relu(x.detach()))
    site.enabled = False
    site.observer.enabled = False
    out = site(deferred_relu(x))
    assert torch.equal(out, torch.relu(x))
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, (x > 0).float())


# -- statistics updates (issue 22): the same ranges, bit for bit, in fewer calls ------------------------------


def _tail_nodes_np(rng, rows: int, kind: str) -> tuple:
    """(tail_lo, tail_hi) float32 nodes as an observer holds them: the p_lo / p_hi quantile first, the extreme last."""
    import numpy as np

    from qtrim_fx.runtime.range_rule import TAIL_FRACTIONS

    k = len(TAIL_FRACTIONS)
    q_hi = rng.normal(1.0, 1.0, (rows, 1))
    q_lo = np.zeros((rows, 1)) if kind == "relu" else -np.abs(rng.normal(1.0, 1.0, (rows, 1)))
    steps_hi, steps_lo = rng.exponential(0.1, (rows, k - 1)), rng.exponential(0.1, (rows, k - 1))
    if kind == "ties":  # repeated nodes (a few distinct values in the tail)
        steps_hi[:, ::2] = steps_lo[:, 1::2] = 0.0
    if kind == "relu":
        steps_lo[:] = 0.0
    hi = np.concatenate([q_hi, q_hi + np.cumsum(steps_hi, -1)], -1)
    if kind == "outlier":
        hi[:, -1] *= 50.0
    lo = np.concatenate([q_lo, q_lo - np.cumsum(steps_lo, -1)], -1)
    return lo.astype(np.float32), hi.astype(np.float32)


@pytest.mark.parametrize("kind", ["gauss", "relu", "ties", "outlier"])
@pytest.mark.parametrize("rows", [1, 5])
def test_closed_form_range_fast_path_chooses_the_same_range(monkeypatch, kind, rows):
    import numpy as np

    from qtrim_fx.runtime import range_rule

    rng = np.random.default_rng(rows * 10 + len(kind))
    grids = [QuantScheme(bits=8, signed=False, symmetric=False), QuantScheme(bits=4, signed=False, symmetric=False)]
    closed = 0
    for trial in range(60):
        tl, th = _tail_nodes_np(rng, rows, kind)
        p_lo, p_hi = (0.001, 0.999) if trial % 3 else (0.01, 0.99)
        grid, unclip = grids[trial % 2], trial % 4 < 2
        closed += bool((th[:, 0] >= 0).all() and (tl[:, 0] <= 0).all())
        results = []
        for fast in (False, True):
            monkeypatch.setattr(range_rule, "FAST_CLOSED_FORM", fast)
            results.append(range_rule.mse_range(torch.from_numpy(tl), torch.from_numpy(th), p_lo, p_hi, grid, unclip))
        (lo_ref, hi_ref), (lo, hi) = results
        assert torch.equal(_bits(lo), _bits(lo_ref)) and torch.equal(_bits(hi), _bits(hi_ref))
    assert closed >= 10  # the fast branch was exercised


def test_ema_update_in_place_is_the_blend_formula():
    obs = EmaQuantileObserver("range", act_range="mse", update_every=4)
    g = torch.Generator().manual_seed(7)
    obs.observe(torch.randn(4096, generator=g))  # initializes the EMAs (the masked first-observation branch)
    mu = obs.update_momentum
    for _ in range(5):
        tl0, th0 = obs.tail_lo.clone(), obs.tail_hi.clone()
        lo_t, hi_t = torch.randn(tl0.shape, generator=g), torch.randn(th0.shape, generator=g)
        version = obs.tail_lo._version
        obs._finite_ema(obs.tail_lo, obs.tail_hi, lo_t, hi_t)
        assert torch.equal(_bits(obs.tail_lo), _bits((1.0 - mu) * tl0 + mu * lo_t))
        assert torch.equal(_bits(obs.tail_hi), _bits((1.0 - mu) * th0 + mu * hi_t))
        assert obs.tail_lo._version > version  # cached qparams keyed on the version see the change


@pytest.mark.parametrize("every", [1, 3, 4])
def test_observer_forward_counts_non_update_calls_like_train_call(every):
    """The non-update early exit of ``forward`` keeps the same call count, update phase and statistics."""
    a = EmaQuantileObserver("range", act_range="mse", update_every=every, seed=3).train()
    b = EmaQuantileObserver("range", act_range="mse", update_every=every, seed=3).train()
    g = torch.Generator().manual_seed(8)
    for _ in range(2 * every + 3):
        x = torch.randn(2, 3, 40, generator=g)
        a(x)
        b._train_call(x, b.lo, b.hi, b.num_updates, b.nonfinite)  # the full bookkeeping on every call
        assert a._calls == b._calls and a._updates == b._updates
    for name, buf in a.state_dict().items():
        if isinstance(buf, torch.Tensor):
            ref = b.state_dict()[name]
            assert torch.equal(buf, ref) or (buf.is_floating_point() and torch.equal(_bits(buf), _bits(ref)))


# -- per-channel weights (reader modifies in place: the 1-byte mask path), issue 22 -------------------------


@pytest.mark.parametrize("lam", [0.3, 1.0])
@pytest.mark.parametrize("zero_point", [False, True])
def test_per_channel_mask_path_gives_the_where_formula(lam, zero_point):
    """Value ``lerp(w, ŵ, λ)``; gradient ``(1 − λ)·g + λ·where(lo < w̃ < hi, g, 0)`` bit for bit (NaN, ±inf, −0.0 included)."""
    from qtrim_fx.runtime.blend import _masked

    g = torch.Generator().manual_seed(9)
    w0 = torch.randn(6, 5, 3, generator=g) * 2
    w0.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e30])
    scale = channel_view(torch.rand(6, generator=g) * 0.05 + 1e-3, 3, 0)
    zp = channel_view(torch.randint(-5, 6, (6,), generator=g).float(), 3, 0) if zero_point else None
    qmin, qmax = (-128, 127) if zero_point else (-127, 127)
    up = torch.randn(w0.shape, generator=g)
    up.view(-1)[7] = float("nan")
    w = w0.clone().requires_grad_()
    out = BlendQuantFn.apply(w, scale, zp, torch.tensor(lam), qmin, qmax, lam == 1.0, False, True, None)
    (gw,) = torch.autograd.grad(out, w, up)
    z = 0.0 if zp is None else zp
    xq = fake_quantize_broadcast(w0, scale, zp, qmin, qmax)
    ref_out = xq if lam == 1.0 else torch.lerp(w0, xq, torch.tensor(lam))  # λ = 1: x̂ itself (no lerp of ±inf)
    lo, hi = (qmin - z) * scale, (qmax - z) * scale
    kept = torch.where((ref_out > lo) & (ref_out < hi), up, 0.0)
    ref_g = kept if lam == 1.0 else torch.lerp(up, kept, torch.tensor(lam))
    assert torch.equal(_bits(out), _bits(ref_out))
    assert torch.equal(_bits(gw), _bits(ref_g))
    mask = torch.rand(w0.shape, generator=g) > 0.5
    assert torch.equal(_bits(_masked(up, mask)), _bits(torch.where(mask, up, 0.0)))


@pytest.mark.parametrize("c,n,k", [(1, 3200, 3), (1, 100_000, 102), (3, 4096, 7), (1, 4096, 7), (16, 2048, 2)])
@pytest.mark.parametrize("largest", [True, False])
def test_top_values_host_candidates_match_the_torch_gather(c, n, k, largest):
    """Candidates gathered with NumPy: the same blocks in the same order as ``gather``, so the same values
    (zeros of both signs and ties included)."""
    import numpy as np

    from qtrim_fx.runtime import quantiles

    g = torch.Generator().manual_seed(c * n + k)
    v = torch.randn(c, n, generator=g).round_()  # many ties
    v[:, ::7] = -0.0
    v[:, 3::11] = 0.0
    out = quantiles.top_values(v, k, largest)
    blocks = v.view(c, n // quantiles._BLOCK, quantiles._BLOCK)
    ends = (blocks.amax(-1) if largest else blocks.amin(-1)).numpy()
    nb = ends.shape[-1]
    pick = np.argpartition(ends, nb - k, -1)[:, nb - k:] if largest else np.argpartition(ends, k - 1, -1)[:, :k]
    pick = torch.from_numpy(np.ascontiguousarray(pick, dtype=np.int64))
    cand = blocks.gather(1, pick.unsqueeze(-1).expand(c, k, quantiles._BLOCK)).reshape(c, -1)
    ref = quantiles._topk_values(cand, k, largest)
    assert torch.equal(_bits(out), _bits(ref))
    assert torch.equal(out, torch.topk(v, k, dim=-1, largest=largest).values)


@pytest.mark.parametrize("where", ["site", "global"])
def test_hooks_on_a_site_see_the_relu_output_not_the_deferred_input(where):
    """A hook sees a site's arguments: a deferred relu is applied before it (values of the graph's ReLU)."""
    control = BlendControl(1.0)
    site = QuantSite(UINT8, EmaQuantileObserver("range"), control)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    site.observer.observe(torch.relu(x.detach()))
    site.observer.enabled = False
    seen = []

    def hook(mod, args):
        seen.append(args[0].detach().clone())

    register = torch.nn.modules.module.register_module_forward_pre_hook if where == "global" else \
        site.register_forward_pre_hook
    handle = register(hook)
    try:
        out = site(deferred_relu(x))
    finally:
        handle.remove()
    assert torch.equal(seen[-1], torch.relu(x.detach()))
    ref = site(torch.relu(x))
    assert torch.equal(out, ref)


# -- quantize_owned_: the in-place λ = 1 path in native autograd is BlendQuantFn, bit for bit -------------------


@pytest.mark.parametrize("grid", ["uint8_z0", "uint8_z", "int8_symmetric", "int4"])
def test_quantize_owned_matches_blend_quant_bits_and_gradients(grid):
    from qtrim_fx.runtime.blend import BlendQuantFn, host_bounds, quantize_owned_

    qmin, qmax, z = {"uint8_z0": (0, 255, 0.0), "uint8_z": (0, 255, 37.0), "int8_symmetric": (-127, 127, None),
                     "int4": (-8, 7, 0.0)}[grid]
    scale = torch.tensor(0.0371, dtype=torch.float32)
    zp = None if z is None else torch.tensor(z, dtype=torch.float32)
    g = torch.Generator().manual_seed(11)
    base = torch.randn(4096, generator=g) * 4
    ks = torch.arange(-300, 300, dtype=torch.float32)
    special = torch.cat([
        (ks + 0.5) * scale,                      # ties of x / s
        ks * scale, ks * scale + 1e-7, ks * scale - 1e-7,
        torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38]),
    ])
    x = torch.cat([base, special])
    lo, hi = host_bounds(scale, zp, qmin, qmax)
    up = torch.randn(x.shape, generator=g)
    lam = torch.tensor(1.0)

    a = x.clone().requires_grad_()
    ref = BlendQuantFn.apply(a * 1.0, scale, zp, lam, qmin, qmax, True, True, True, (lo, hi))
    (ref_g,) = torch.autograd.grad(ref, a, up)

    b = x.clone().requires_grad_()
    owned = b * 1.0  # a fresh tensor nothing else reads
    out = quantize_owned_(owned, scale, (lo, hi))
    assert out is owned
    (got_g,) = torch.autograd.grad(out, b, up)
    assert torch.equal(_bits(out), _bits(ref))
    assert torch.equal(_bits(got_g), _bits(ref_g))


# -- quantize_folded_one: the λ = 1 BN-folded weight in one call, the generic path's bits --------------------


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("zero_fold", [False, True])
@pytest.mark.parametrize("special", [False, True])
def test_quantize_folded_one_matches_the_generic_path(per_channel, zero_fold, special):
    w0, f, scale = _folded(per_channel)
    if not zero_fold:
        f = torch.where(f == 0, 0.5, f)
    if special:  # ±0, exact grid ties, far beyond the grid, NaN, ±inf
        w0[0, 0, 0] = torch.tensor([-0.0, 0.0, float("nan")])
        w0[1, 0, 0] = torch.tensor([1e30, -1e30, float("inf")])
        w0[3, 1, 1] = 0.5 * scale.reshape(-1)[3 if per_channel else 0] / f.reshape(-1)[3]
    g = torch.randn(w0.shape, generator=torch.Generator().manual_seed(5))
    w_ref = w0.clone().requires_grad_()
    ref = blend_quant_folded(w_ref, fold_product(w_ref, f), f, scale, None, torch.tensor(1.0), -127, 127, True)
    (g_ref,) = torch.autograd.grad(ref, w_ref, g)
    w = w0.clone().requires_grad_()
    out = quantize_folded_one(w, f.reshape(-1), scale, -127, 127)
    assert type(out.grad_fn).__name__ == "CloneBackward0"  # no Python backward
    (gw,) = torch.autograd.grad(out, w, g)
    assert torch.equal(_bits(out), _bits(ref))
    assert torch.equal(_bits(gw), _bits(g_ref)) and torch.equal(gw, g)  # identity gradient
    assert torch.equal(_bits(w.detach()), _bits(w0))  # the master weight is not touched


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_folded_weight_site_takes_the_lean_path_only_where_statistics_stay(monkeypatch, every, lam):
    """A weight site at λ = 1: counted calls (statistics unchanged) run quantize_folded_one, update calls, λ < 1
    and first use the generic path; values, gradients and statistics equal a site forced onto the generic path."""
    import qtrim_fx.runtime.site as site_mod

    lean_calls = []
    real = site_mod.quantize_folded_one

    def counting(*args):
        lean_calls.append(1)
        return real(*args)

    monkeypatch.setattr(site_mod, "quantize_folded_one", counting)
    scheme = QuantScheme(bits=8, signed=True, symmetric=True, narrow=True, axis=0)
    sites = [QuantSite(scheme, EmaQuantileObserver("range", axis=0, momentum=0.5, update_every=every),
                       BlendControl(lam), kind="weight") for _ in range(2)]
    sites[1]._folded_one = lambda *a: None  # the generic path only
    gen = torch.Generator().manual_seed(6)
    w0 = torch.randn(6, 4, 3, 3, generator=gen)
    f = torch.tensor([0.7, 1.3, 0.0, 2.1, 0.9, 1.0])
    results = [[], []]
    for _ in range(7):
        w0 = w0 + 0.1 * torch.randn(w0.shape, generator=gen)  # the weight moves every step, as in training
        for site, res in zip(sites, results, strict=True):
            site.train()
            w = w0.clone().requires_grad_()
            out = site(w, f)
            (gw,) = torch.autograd.grad(out, w, torch.full_like(w, 0.5))
            res.append((_bits(out), _bits(gw), site.observer.lo.clone(), site.observer.hi.clone()))
    for a, b in zip(*results, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # calls 1..7 of the lean site: the first updates (and caches); later ones are lean unless they update
    expected = 0 if lam != 1.0 else sum(1 for c in range(1, 7) if c % every)
    assert len(lean_calls) == expected
