"""The fast training path keeps the normative semantics (DESIGN.md "Semantics").

- the in-place / cached / λ=1-shortcut eager path gives the reference formulas' bits;
- ``update_every=N`` statistics equal a hand-computed EMA of numpy quantiles at calls 1, N+1, 2N+1;
- qparams are derived only when the statistics changed;
- torch.compile (fullgraph, statistics updating) agrees with eager;
- autocast bf16 training steps run with finite loss and gradients;
- λ = 0 is bit-identical to the original model;
- benchmarks/train_overhead.py runs end to end (tiny sizes).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from qtrim_fx.models import get_model

import qtrim_fx
import qtrim_fx.runtime.site as site_mod
from qtrim_fx.core.fakequant import derive_qparams, fake_quantize_raw, quantize
from qtrim_fx.runtime.blend import blend_to
from qtrim_fx.runtime.ops import channel_shape

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _prepared(name: str = "tiny_convnet", lam: float = 1.0, config=None, **kw):
    model, (x,) = get_model(name, batch_size=4, **kw)
    qm = qtrim_fx.prepare(model, config=config)
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, lam)
    return model, qm, x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous().view(torch.int32)


# -- the fast eager path is the reference formula, bit for bit ---------------------------------------------


def _reference_site(site, x, fold=None):
    """The straightforward (pre-optimization) site forward, statistics frozen."""
    f = None if fold is None else channel_shape(fold.detach().to(x.dtype), x.dim(), 0)
    if site.control.is_zero or site.float_output:  # a model output left float is never quantized
        return x
    scale, zp = site.qparams()
    s = site.scheme
    lam = site.control.value
    if f is None:
        xf = x.float()
        xq = fake_quantize_raw(xf, scale, zp, s.qmin, s.qmax, s.axis)
        return torch.lerp(xf, xq, lam).to(x.dtype)
    # The integer grid of the folded weight w·f exactly as QuantizeLinear computes it, handed to
    # the training conv as q · (s / f) (the float stand-in for Q(w·f) / f).
    xs = x.detach() * f
    sc = scale.reshape(f.shape)
    q = quantize(xs.float(), scale, zp, s).float() - zp.reshape(f.shape)
    return blend_to(x, torch.where(f != 0, (q * (sc / f)).to(x.dtype), x.detach()), lam)


@pytest.mark.parametrize("name", ["tiny_convnet", "attention_block"])
@pytest.mark.parametrize("lam", [0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_site_gives_the_reference_bits(name, lam, dtype):
    _, qm, x = _prepared(name, lam)
    qm.eval()
    calls = []

    def hook(mod, args, out):
        calls.append((mod, args, out))

    handles = [site.register_forward_hook(hook) for _, site, _ in qtrim_fx.iter_sites(qm)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        qm(x)
    for h in handles:
        h.remove()
    assert len(calls) >= 4
    assert any(len(args) == 2 for _, args, _ in calls) or name != "tiny_convnet"  # BN-folded weights seen
    for site, args, out in calls:
        ref = _reference_site(site, *args)
        assert out.dtype == args[0].dtype == ref.dtype
        if len(args) == 2:
            # The folded weight's float stand-in q·(s/f) may carry -0.0 where q = 0 (it has no
            # deployed counterpart; the conv result is the same): compare with signed zeros equal.
            out, ref = out + 0.0, ref + 0.0
        assert torch.equal(_bits(out), _bits(ref)), site.observer_name()


@pytest.mark.parametrize("lam", [0.4, 1.0])
def test_folded_weight_with_zero_and_nan_fold_factors_gives_the_reference_bits(lam):
    # γ = 0 channels keep w (no division by zero); the eager path skips the weight-sized
    # ``where`` only when no channel has f = 0, so both branches are checked here.
    _, qm, _ = _prepared("tiny_convnet", lam)
    qm.eval()
    w = qm.get_parameter("conv1.weight")
    site = next(s for spec, s, _ in qtrim_fx.iter_sites(qm) if spec.param == "conv1.weight")
    c = w.shape[0]
    folds = [torch.rand(c) + 0.5, torch.rand(c) + 0.5, torch.rand(c) + 0.5]
    folds[1][1] = 0.0
    folds[2][0], folds[2][2] = 0.0, float("nan")
    for fold in folds:
        out = site(w, fold)
        ref = _reference_site(site, w, fold)
        assert torch.equal(_bits(out + 0.0), _bits(ref + 0.0))  # signed zeros equal, see above
    assert torch.equal(site(w, folds[1])[1], w[1].detach())


def test_only_the_output_is_saved_for_backward_and_gradients_follow_the_clipped_ste():
    _, qm, _ = _prepared("tiny_convnet", 0.6)
    qm.train()
    for _, site, _ in qtrim_fx.iter_sites(qm):
        site.observer.enabled = False
    w = qm.get_parameter("conv1.weight")
    fold_site = next(s for spec, s, _ in qtrim_fx.iter_sites(qm) if spec.param == "conv1.weight")
    act_site = next(s for spec, s, _ in qtrim_fx.iter_sites(qm) if spec.kind == "activation")
    fold = torch.rand(w.shape[0]) + 0.5
    a = (torch.randn(4, 8, 5, 5) * 3).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        yw = fold_site(w, fold)
        assert saved == []  # folded weight sites: identity gradient, nothing saved
        ya = act_site(a)
    # Activation sites keep their own output (which the next layer saves anyway) plus 0-D qparams.
    assert sum(t.numel() for t in saved if t.data_ptr() != ya.data_ptr()) <= 3
    assert any(t.data_ptr() == ya.data_ptr() for t in saved)
    gw, = torch.autograd.grad(yw.sum(), w)
    ga, = torch.autograd.grad(ya.sum(), a)
    assert torch.equal(gw, torch.ones_like(w))
    scale, zp = act_site.qparams()
    lo, hi = (act_site.scheme.qmin - zp) * scale, (act_site.scheme.qmax - zp) * scale
    inside = (ya > lo) & (ya < hi)
    assert torch.equal(ga, torch.where(inside, 1.0, 1.0 - qm.qtrim_blend.value).expand_as(a))


# -- statistics: update_every and the qparams cache -------------------------------------------------------


@pytest.mark.parametrize("every", [1, 3])
def test_update_every_statistics_equal_the_hand_computed_ema(every):
    mu = 0.25
    # The paper's quantile rule; μ is per training step: an update every N steps uses 1 − (1 − μ)^N.
    config = qtrim_fx.QuantConfig.paper(update_every=every, momentum=mu)
    model, (x0,) = get_model("tiny_mlp", batch_size=8)
    qm = qtrim_fx.prepare(model, config=config).train()  # no calibrate: call 1 initializes the EMA
    sites = {spec.name: site for spec, site, _ in qtrim_fx.iter_sites(qm)}
    act = sites["input.x"]
    weight = next(site for spec, site, _ in qtrim_fx.iter_sites(qm) if spec.kind == "weight")
    seen = []
    act.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    gen = torch.Generator().manual_seed(3)
    steps = 2 * every + 2
    for _ in range(steps):
        qm(torch.randn(x0.shape, generator=gen) * 2 + 0.5)
    updates = [c for c in range(1, steps + 1) if (c - 1) % every == 0]
    assert act.observer._calls == steps and int(act.observer.num_updates) == len(updates)
    lo = hi = None
    mu_n = 1 - (1 - mu) ** every
    for c in updates:
        v = seen[c - 1].numpy().ravel()
        lo_t, hi_t = np.quantile(v, 0.001), np.quantile(v, 0.999)
        lo, hi = (lo_t, hi_t) if lo is None else ((1 - mu_n) * lo + mu_n * lo_t, (1 - mu_n) * hi + mu_n * hi_t)
    np.testing.assert_allclose(float(act.observer.lo), lo, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(act.observer.hi), hi, rtol=1e-5, atol=1e-6)
    # The weight does not change (no optimizer): its per-channel EMA stays the first |w| quantile.
    w = qm.get_parameter(next(s.param for s, site, _ in qtrim_fx.iter_sites(qm) if site is weight)).detach()
    m = np.quantile(np.abs(w.numpy().reshape(w.shape[0], -1)), 0.999, axis=1)
    np.testing.assert_allclose(weight.observer.hi.numpy(), m, rtol=1e-5, atol=1e-6)
    assert int(weight.observer.num_updates) == len(updates)


def test_qparams_are_derived_only_when_statistics_change(monkeypatch):
    _, qm, x = _prepared("tiny_mlp", 1.0, config=qtrim_fx.QuantConfig(update_every=3))
    n_sites = sum(not site.float_output for _, site, _ in qtrim_fx.iter_sites(qm))  # logits stay float
    count = [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return derive_qparams(*args, **kwargs)

    monkeypatch.setattr(site_mod, "derive_qparams", counting)
    qm.train()
    per_step = []
    for _ in range(6):
        before = count[0]
        qm(x)
        per_step.append(count[0] - before)
    # Updates on calls 1 and 4 (update_every=3): derive then, cached in between.
    assert per_step == [n_sites, 0, 0, n_sites, 0, 0]
    qm.eval()
    qm(x)
    assert count[0] == 2 * n_sites
    # load_state_dict writes the statistics in place (every site's): the caches notice.
    spec, site = next((spec, site) for spec, site, _ in qtrim_fx.iter_sites(qm) if site.observer.hi.dim() == 0)
    state = copy.deepcopy(qm.state_dict())
    state[f"qtrim_sites.{spec.key}.observer.hi"] *= 2
    qm.load_state_dict(state)
    before = count[0]
    qm(x)
    assert count[0] == before + n_sites
    scale, _ = site._training_qparams(2)
    assert torch.equal(scale, derive_qparams(site.scheme, *site.observer.stats(), site.eps)[0])


# -- torch.compile ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_compiled_training_matches_eager_bit_for_bit(lam):
    """aot_eager: dynamo + AOT autograd without inductor's own float reassociation, so bits must match.

    fullgraph=True: the whole prepared model, observers updating, is one graph.
    """
    _, qm, x = _prepared("tiny_convnet", lam)
    qm.train()
    for _, site, _ in qtrim_fx.iter_sites(qm):
        site.observer.update_every = 2
        site.observer.momentum = 0.3
    twin = copy.deepcopy(qm)
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    for i in range(3):
        xi = x * (1 + 0.5 * i)
        a, b = qm(xi), compiled(xi)
        assert torch.equal(a, b)
        a.sum().backward()
        b.sum().backward()
    for (name, t1), (_, t2) in zip(qm.named_buffers(), twin.named_buffers(), strict=True):
        assert torch.equal(t1, t2), name
    for (name, p1), (_, p2) in zip(qm.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(p1.grad, p2.grad), name
    torch._dynamo.reset()


def test_compiled_prepared_model_has_no_graph_breaks():
    _, qm, x = _prepared("attention_block", 1.0)
    qm.train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(qm)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_inductor_forward_agrees_with_eager():
    """inductor (C++ codegen on CPU): the quantizer is exact; lerp / conv fusion may move the last ulp."""
    _, qm, x = _prepared("tiny_convnet", 1.0)
    qm.eval()
    torch._dynamo.reset()
    compiled = torch.compile(qm, backend="inductor", fullgraph=True)
    for lam in (0.5, 1.0):
        qtrim_fx.set_blend(qm, lam)
        torch.testing.assert_close(compiled(x), qm(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# -- autocast -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_convnet", "attention_block"])
def test_autocast_bf16_training_step_is_finite(name):
    _, qm, x = _prepared(name, 1.0)
    qm.train()
    dtypes = []
    handles = [site.register_forward_hook(lambda m, a, o: dtypes.append((a[0].dtype, o.dtype)))
               for spec, site, _ in qtrim_fx.iter_sites(qm) if spec.kind == "activation"]
    opt = torch.optim.SGD(qm.parameters(), lr=1e-2, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = qm(x)
        loss = out.float().pow(2).mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in qm.parameters() if p.grad is not None)
        opt.step()
    for h in handles:
        h.remove()
    assert all(i == o for i, o in dtypes)  # a site keeps its input's dtype
    assert (torch.bfloat16, torch.bfloat16) in dtypes
    for _, site, _ in qtrim_fx.iter_sites(qm):
        assert torch.isfinite(site.observer.lo).all() and site.observer.lo.dtype == torch.float32


# -- λ = 0 -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_convnet", "attention_block"])
def test_lambda_zero_training_step_is_bit_identical_to_the_model(name):
    model, (x,) = get_model(name, batch_size=4)
    model.train()
    ref_model = copy.deepcopy(model)
    qm = qtrim_fx.prepare(model).train()  # shares model's parameters; λ = 0
    out_ref, out = ref_model(x), qm(x)
    assert torch.equal(_bits(out_ref), _bits(out))
    out_ref.square().sum().backward()
    out.square().sum().backward()
    for (n, p_ref), (_, p) in zip(ref_model.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(p_ref.grad, p.grad), n
    assert all(site.observer.initialized for _, site, _ in qtrim_fx.iter_sites(qm))  # statistics still update


# -- benchmark smoke ----------------------------------------------------------------------------------------


def test_train_overhead_benchmark_smoke():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "train_overhead.py"
    spec = importlib.util.spec_from_file_location("train_overhead", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_overhead", module)
    spec.loader.exec_module(module)
    results = Path(module.__file__).with_name("RESULTS.md")
    before = results.read_text() if results.exists() else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = module.main(["--quick", "--no-write", "--models", "resnet18", "--repeats", "1", "--warmup", "1"])
    ((key, _, configs),) = out["results"]
    by = {c.key: c for c in configs}
    assert key == "resnet18"
    paper = module.PAPER  # the paper's per-step cadence; "ours" runs at QuantConfig() defaults
    for k in ("fp32", "ours", paper, "ours, frozen stats", "torch.ao", "fp32 bf16", "ours bf16"):
        assert by[k].error is None and len(by[k].times) == 1 and by[k].peak > 0, k
    assert {site.observer.update_every for _, site, _ in qtrim_fx.iter_sites(by[paper].model)} == {1}
    default = qtrim_fx.QuantConfig().update_every
    assert {site.observer.update_every for _, site, _ in qtrim_fx.iter_sites(by["ours"].model)} == {default}
    assert "| ours |" in out["markdown"] and "ours/FP32" in out["markdown"]
    assert "floor FP32/torch.ao" in out["markdown"]  # the ratio a zero-cost quantizer would reach
    assert (results.read_text() if results.exists() else None) == before  # --no-write


def test_observer_cost_benchmark_smoke(monkeypatch):
    """observer_cost.py times each case with and without the NumPy selection and leaves the switch on."""
    from qtrim_fx.runtime import quantiles as obs

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "observer_cost.py"
    spec = importlib.util.spec_from_file_location("observer_cost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "CASES", [c for c in module.CASES if np.prod(c[2]) <= 200_000]
                        + [("range, per-tensor, 1e6", {"mode": "range"}, (10, 1000, 10, 10), torch.float32)])
    rows = module.measure(repeats=2, warmup=1)
    assert obs.HOST_SELECT is True
    assert len(rows) == len(module.CASES) and all(r[2] > 0 and r[4] > 0 for r in rows)
    table = module.render(rows, "python benchmarks/observer_cost.py")
    assert "topk only (ms)" in table and "ours vs topk only" in table


# -- observer fast paths are exact -----------------------------------------------------------------------------


def test_block_prefiltered_top_values_equal_topk():
    from qtrim_fx.runtime.quantiles import top_values as _top_values

    gen = torch.Generator().manual_seed(0)
    for trial in range(120):
        c, nb = int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(8, 300, (1,), generator=gen))
        v = torch.randn(c, nb * 32, generator=gen)
        if trial % 4 == 1:
            v = v.mul(3).round()  # many ties
        elif trial % 4 == 2:
            v = v.sort(-1).values  # extremes clustered in a few runs
        elif trial % 4 == 3:
            v[v > 1.5] = -float("inf")
        k = int(torch.randint(1, max(2, nb // 8), (1,), generator=gen))
        for largest in (True, False):
            assert torch.equal(_top_values(v, k, largest), torch.topk(v, k, largest=largest).values)


def _selection_inputs(c: int, n: int, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    v = torch.randn(c, n, generator=gen, dtype=dtype)
    signed_zeros = v.clone()
    signed_zeros[:, ::3] = 0.0
    signed_zeros[:, 1::3] = -0.0
    infs = v.clone()
    infs[:, ::7] = float("inf")
    infs[:, 1::11] = -float("inf")
    return [v, v.mul(2).round(), v.sort(-1).values, v.sort(-1, descending=True).values,
            torch.full_like(v, 1.5), signed_zeros, infs, v.abs()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("c", "n", "k"), [(1, 3125, 102), (1, 3264, 102), (768, 128, 3), (576, 9, 2),
                                            (96, 25, 2), (3, 640, 11), (2, 300, 300)])
def test_numpy_selection_equals_topk(dtype, c, n, k):
    """Where CPU topk would sort whole rows, the tails are selected with numpy.partition: same values."""
    from qtrim_fx.runtime import quantiles as obs

    gen = torch.Generator().manual_seed(c * 7919 + n)
    for v in _selection_inputs(c, n, dtype, gen):
        assert obs.host_selects(v, k)  # the NumPy path is the one under test
        for largest in (True, False):
            ref = torch.topk(v, k, dim=-1, largest=largest, sorted=True).values
            got = obs._topk_values(v, k, largest)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert torch.equal(got, ref)  # (== treats -0.0 and +0.0 as equal)


def test_tail_quantiles_of_a_tensor_that_requires_grad():
    """tail_quantiles is public: a grad-tracking input takes the NumPy path like a plain one."""
    from qtrim_fx.runtime.quantiles import tail_quantiles

    w = torch.randn(3, 100_000, generator=torch.Generator().manual_seed(0))
    ref, valid_ref = tail_quantiles(w, 0.999)
    got, valid = tail_quantiles(w.clone().requires_grad_() * 1.0, 0.999)
    assert torch.equal(got.detach(), ref) and torch.equal(valid, valid_ref)


def test_numpy_selection_is_skipped_where_topk_is_cheaper():
    from qtrim_fx.runtime import quantiles as obs

    assert not obs.host_selects(torch.randn(512, 192), 3)  # topk's partial sort (64*k <= n)
    assert not obs.host_selects(torch.randn(1, 27), 2)  # too small to pay the round trip
    assert not obs.host_selects(torch.randn(768, 128, dtype=torch.bfloat16), 3)  # no NumPy dtype
    assert obs.host_selects(torch.randn(768, 128), 3)


@pytest.mark.parametrize(("mode", "axis", "shape"), [("range", None, (64, 65, 768)), ("range", None, (8, 16, 32, 32)),
                                                     ("abs", 0, (768, 192)), ("abs", 0, (576, 1, 3, 3)),
                                                     ("abs", 0, (64, 3, 7, 7)), ("range", 1, (16, 96, 8, 8))])
def test_observer_statistics_equal_with_and_without_numpy_selection(monkeypatch, mode, axis, shape):
    """Whole observer updates (fast and general CPU paths, EMA included) give the same statistics."""
    from qtrim_fx.runtime import quantiles as obs
    from qtrim_fx.runtime.observer import EmaQuantileObserver

    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(shape, generator=gen) * (1 + i) for i in range(4)]
    xs[2].view(-1)[::97] = float("nan")  # one update through the general (masked) path
    results = []
    for host in (True, False):
        monkeypatch.setattr(obs, "HOST_SELECT", host)
        o = EmaQuantileObserver(mode, axis=axis, momentum=0.3, max_samples=50_000).train()
        for x in xs:
            o(x)
        results.append((o.lo.clone(), o.hi.clone(), o.nonfinite.clone()))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("p_lo", "p_hi"), [(0.001, 0.999), (0.2, 0.7), (0.49, 0.5)])
def test_two_tail_quantiles_equal_the_one_level_path(p_lo, p_hi):
    from qtrim_fx.runtime.quantiles import fill_nonfinite as _fill
    from qtrim_fx.runtime.quantiles import filled_quantile as _filled_quantile
    from qtrim_fx.runtime.quantiles import refill as _refill
    from qtrim_fx.runtime.quantiles import two_tail_quantiles as _two_tail_quantiles

    gen = torch.Generator().manual_seed(1)
    for trial in range(40):
        v = torch.randn(3, int(torch.randint(1, 6000, (1,), generator=gen)), generator=gen)
        if trial % 3 == 0:
            v[torch.rand(v.shape, generator=gen) < 0.2] = float("nan")
        if trial % 5 == 0:
            v[1] = float("inf")  # a row with no finite value
        lo_fill, nf = _fill(v, p_lo)
        lo, hi = _two_tail_quantiles(lo_fill, _refill(lo_fill, p_hi), nf, p_lo, p_hi)
        hi_fill, _ = _fill(v, p_hi)
        valid = nf > 0
        assert torch.equal(lo[valid], _filled_quantile(lo_fill, nf, p_lo)[valid])
        assert torch.equal(hi[valid], _filled_quantile(hi_fill, nf, p_hi)[valid])
