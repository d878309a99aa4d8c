"""InPlaceSitesPass: which sites may quantize their input in place, and that doing so changes no bit.

Structural: the pass marks sites that are the only reader of a fresh tensor nothing keeps (Linear, LayerNorm,
GELU, Add outputs), and no site after a ReLU / sigmoid / softmax (their backward keeps the output), a graph
input, a ``.float()`` (returns its input), a view or a tensor read twice. Numerical: at λ = 1 a training step
with the in-place path gives the same outputs, gradients and updated weights, bit for bit, as without it;
hooks that could keep the tensor (on the producer module, on the site, global ones) turn it off.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtrim_fx
import qtrim_fx.runtime.site as site_mod
from qtrim_fx.passes.prepare.inplace_sites import InPlaceSitesPass


class Net(nn.Module):
    """Sites after: a graph input, linear, layernorm, gelu, add, sigmoid, softmax, .float(), a reshape, a
    tensor with two readers (one a float softmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.norm = nn.LayerNorm(64)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(64, 16)
        self.fc3 = nn.Linear(16, 16)

    def forward(self, x):
        h = self.act(self.norm(self.fc1(x)))        # fc1 out, norm out, act out: fresh, one reader each
        r = self.fc2(h) + x                          # fc2 out, add out
        g = torch.sigmoid(self.fc3(r)).float()       # sigmoid keeps its output; .float() returns it
        p = torch.softmax(g.unflatten(-1, (4, 4)), -1)  # a view; softmax keeps its output
        return p.flatten(-2) * r


def _prepared(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(64, 128, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(Net(), example_inputs=(x[:2],))
        qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 1.0)
    return qm.train(), x


def _marked(qm) -> dict[str, bool]:
    return {name: s.overwrite_input for name, s in qm.qtrim_sites.named_children() if s.kind == "activation"}


def test_marks_sites_that_are_the_last_reader_of_a_fresh_tensor():
    qm, _ = _prepared()
    marked = _marked(qm)
    assert {n for n, on in marked.items() if on} == {"fc1_out", "act_out", "fc2_out", "add", "fc3_out"}
    assert not marked["input_x"]  # the caller's tensor
    assert not marked["sigmoid"]  # sigmoid's backward reads its output
    # idempotent, and it only ever sets the flag on activation sites
    assert not InPlaceSitesPass()(qm).modified
    assert not any(s.overwrite_input for s in qm.qtrim_sites.children() if s.kind == "weight")


def test_only_calls_that_return_a_fresh_tensor_nothing_keeps_are_producers():
    from qtrim_fx.passes.prepare.inplace_sites import _producer

    class Calls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.GELU()
            self.leaky = nn.LeakyReLU(inplace=True)
            self.relu = nn.ReLU()

        def forward(self, x):
            return (self.fc(x), self.act(x), F.linear(x, x), x + x, x.add(x), torch.cat([x, x]), x.mean(0),  # fresh
                    self.leaky(x), self.relu(x), torch.sigmoid(x), torch.tanh(x), torch.softmax(x, -1), x.exp(),
                    x.float(), x.contiguous(), x.reshape(-1), x.add_(1), x.relu_(), F.silu(x, inplace=True),
                    F.silu(x, True), F.leaky_relu(x, 0.1, True))

    gm = torch.fx.symbolic_trace(Calls())
    calls = [n for n in gm.graph.nodes if n.op.startswith("call")]
    got = [_producer(gm, n)[0] for n in calls]
    assert got == [True] * 7 + [False] * 14, [(n.target, g) for n, g in zip(calls, got, strict=True)]
    assert _producer(gm, calls[0])[1] is gm.fc and _producer(gm, calls[2])[1] is None


def test_a_tensor_with_a_second_reader_is_not_marked():
    from qtrim_fx.core.scheme import QuantScheme
    from qtrim_fx.runtime.blend import BlendControl
    from qtrim_fx.runtime.observer import EmaQuantileObserver

    class SiteAndFloatReader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            ctl = BlendControl(1.0)
            self.s1 = site_mod.QuantSite(QuantScheme(signed=False, symmetric=False), EmaQuantileObserver(), ctl)
            self.s2 = site_mod.QuantSite(QuantScheme(signed=False, symmetric=False), EmaQuantileObserver(), ctl)

        def forward(self, x):
            a = x @ x
            b = x * 2
            return self.s1(a) + a, self.s2(b)  # a: read by its site and by the add; b: by its site only

    class SitesAsLeaves(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, site_mod.QuantSite) or super().is_leaf_module(m, name)

    root = SiteAndFloatReader()
    gm = torch.fx.GraphModule(root, SitesAsLeaves().trace(root))
    assert InPlaceSitesPass()(gm).modified
    assert not gm.s1.overwrite_input and gm.s2.overwrite_input


def _switched_off(qm):
    """A copy of ``qm`` whose sites never quantize in place."""
    off = copy.deepcopy(qm)
    for site in off.qtrim_sites.children():
        site.overwrite_input = False
    return off


def _step(qm, x):
    """One SGD step: (output, input gradient, weights after the step)."""
    xg = x.clone().requires_grad_()
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    out = qm(xg)
    out.square().sum().backward()
    opt.step()
    return out.detach(), xg.grad, [p.detach().clone() for p in qm.parameters()]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_in_place_quantization_changes_no_bit_of_values_gradients_or_updates():
    qm, x = _prepared()
    ref = _switched_off(qm)
    out, gx, params = _step(qm, x)            # in place on every marked site
    ref_out, ref_gx, ref_params = _step(ref, x)
    assert torch.equal(_bits(out), _bits(ref_out))
    assert torch.equal(_bits(gx), _bits(ref_gx))
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(params, ref_params, strict=True))


def _pointers(qm, x) -> dict[str, tuple[int, int]]:
    """(input, output) data pointers of every quantizing activation site in one forward."""
    seen: dict[str, tuple[int, int]] = {}
    names = {id(m): n for n, m in qm.qtrim_sites.named_children() if m.kind == "activation" and not m.float_output}
    orig = site_mod.QuantSite.forward

    def spy(self, t, fold=None):
        ptr = t.data_ptr()
        out = orig(self, t, fold)
        if id(self) in names:
            seen[names[id(self)]] = (ptr, out.data_ptr())
        return out

    site_mod.QuantSite.forward = spy
    try:
        qm(x)
    finally:
        site_mod.QuantSite.forward = orig
    return seen


def test_the_site_writes_into_its_input_only_at_lambda_one():
    qm, x = _prepared()
    marked = {n for n, on in _marked(qm).items() if on}
    ptrs = _pointers(qm, x)
    # The Linears' outputs on 3-D input are views of their 2-D products: written through those.
    assert {n for n, (i, o) in ptrs.items() if i == o} == marked == {"fc1_out", "act_out", "fc2_out", "add", "fc3_out"}
    assert not any(i == o for i, o in _pointers(_switched_off(qm), x).values())
    qtrim_fx.set_blend(qm, 0.5)  # λ < 1: the blend needs the float input
    assert not any(i == o for i, o in _pointers(qm, x).values())


@pytest.mark.parametrize("where", ["producer", "site", "global"])
def test_a_hook_that_could_keep_the_tensor_turns_in_place_off(where):
    """A hook on the module computing a site's input (a distillation feature, say), on the site, or a global
    one may keep a reference to the tensor: it must keep its float values after the forward."""
    qm, x = _prepared()
    kept = []
    target = qm.get_submodule("act" if where == "producer" else "qtrim_sites.act_out")
    if where == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: kept.append(o))
    elif where == "producer":
        handle = target.register_forward_hook(lambda m, a, o: kept.append(o))
    else:
        handle = target.register_forward_pre_hook(lambda m, a: kept.append(a[0]))
    try:
        ptrs = _pointers(qm, x)
    finally:
        handle.remove()
    i, o = ptrs["act_out"]
    assert i != o
    feats = [t for t in kept if isinstance(t, torch.Tensor) and t.data_ptr() == i]
    assert feats and feats[0]._version == 0  # never written to


def _built_in_at_one(name: str, **kwargs):
    """A built-in model prepared, calibrated on its example batch, λ = 1, train mode: (model, batch)."""
    from qtrim_fx.models import get_model

    model, (x,) = get_model(name, batch_size=4, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qtrim_fx.prepare(model)
        qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 1.0)
    return qm.train(), x


@pytest.mark.parametrize("name", ["tiny_convnet", "cifar_resnet18"])
def test_conv_bn_relu_sites_in_place_change_no_bit(name):
    """Conv -> BN -> ReLU -> site: the site quantizes the BN output itself (the deferred ReLU's input) in place;
    two training steps give the bits (outputs, input gradients, updated weights, buffers) of the same steps
    without it."""
    qm, x = _built_in_at_one(name)
    assert sum(s.overwrite_input for s in qm.qtrim_sites.children()) >= 3
    ref = _switched_off(qm)
    for _ in range(2):
        out, gx, params = _step(qm, x)
        ref_out, ref_gx, ref_params = _step(ref, x)
        assert torch.equal(_bits(out), _bits(ref_out))
        assert torch.equal(_bits(gx), _bits(ref_gx))
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(params, ref_params, strict=True))
    buffers = dict(ref.named_buffers())
    assert all(torch.equal(b.float(), buffers[k].float()) for k, b in qm.named_buffers() if b.is_floating_point())


def test_in_place_sites_keep_no_more_for_backward():
    """Writing in place keeps one tensor where the copy kept two (the input for the ReLU's or the producer's
    backward is not needed): autograd saves no more — no copy of the input, as torch's in-place ``hardtanh_`` makes."""

    def saved_bytes(model, x) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            if t.numel() >= 1024:  # activations and weights (not the 0-D qparams and λ a Function keeps)
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        return sum(seen.values())

    torch.manual_seed(0)
    qm, x = _built_in_at_one("cifar_resnet18", width=8)
    off = _switched_off(qm)
    assert saved_bytes(qm, x) <= saved_bytes(off, x)


def test_a_view_is_written_through_its_base_only_for_a_matrix_product():
    """A marked site given a view writes through the base only when that base is a fresh matrix product (a Linear's
    3-D output) — not, say, a view of a tensor something else may still read."""
    from qtrim_fx.core.scheme import QuantScheme
    from qtrim_fx.runtime.blend import BlendControl
    from qtrim_fx.runtime.observer import EmaQuantileObserver

    site = site_mod.QuantSite(QuantScheme(signed=False, symmetric=False), EmaQuantileObserver(), BlendControl(1.0))
    a = torch.randn(4, 6, requires_grad=True)
    site.observer.observe(a.detach())
    site.observer.enabled = False
    site.overwrite_input = site.keep_output = True  # as InsertSitesPass / InPlaceSitesPass set them
    base = a * 2.0  # AddBackward-like: an elementwise result, not a product
    version = base._version
    site(base.view(2, 12))
    assert base._version == version  # untouched: the site copied
    product = a @ torch.eye(6)
    version = product._version
    out = site(product.view(2, 12))
    assert product._version > version and out.data_ptr() == product.data_ptr()
