"""LeanReluPass / RestoreReluPass: structure, bit-identical values and gradients, saved memory."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from qtrim_fx.models import get_model
from torch import nn

import qtrim_fx
from qtrim_fx.core.spec import ACT_SITE
from qtrim_fx.passes.lower.restore_relu import RestoreReluPass
from qtrim_fx.passes.prepare.lean_relu import LeanReluPass
from qtrim_fx.runtime.ops import deferred_relu, relu_keep_mask


class Mixed(nn.Module):
    """ReLUs in every form (a site replaces every use of its tensor, so each is read by its site only)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        a = self.act(self.c1(x))          # module, inplace
        b = F.relu(self.c2(a))            # function; its site feeds conv and the residual add
        c = torch.relu(self.c3(b)) + b    # torch function
        y = c.mean((2, 3))
        return self.fc(y).relu()          # method, on the network output


class SiteAndFloatReader(nn.Module):
    """A hand-written graph: one relu output read by a site and by a float op, one by a site only."""

    def __init__(self) -> None:
        super().__init__()
        from qtrim_fx.core.scheme import QuantScheme
        from qtrim_fx.runtime.blend import BlendControl
        from qtrim_fx.runtime.observer import EmaQuantileObserver
        from qtrim_fx.runtime.site import QuantSite

        ctl = BlendControl(1.0)
        self.s1 = QuantSite(QuantScheme(signed=False, symmetric=False), EmaQuantileObserver(), ctl)
        self.s2 = QuantSite(QuantScheme(signed=False, symmetric=False), EmaQuantileObserver(), ctl)

    def forward(self, x):
        a = torch.relu(x)
        b = torch.relu(x * 2)
        return self.s1(a) + a, self.s2(b)


def _lean_nodes(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target is deferred_relu]


def _without_pass(qm: fx.GraphModule) -> fx.GraphModule:
    ref = copy.deepcopy(qm)
    assert RestoreReluPass()(ref).modified
    return ref


def test_site_only_relus_are_swapped_in_place():
    qm = qtrim_fx.prepare(Mixed())
    lean = _lean_nodes(qm)
    assert len(lean) == 4, qm.graph  # module (inplace), F.relu, torch.relu, Tensor.relu
    for n in qm.graph.nodes:
        if n.name in lean:
            assert n.meta.get(ACT_SITE) is not None  # name and SiteSpec kept: the node was edited in place
            assert all(u.op == "call_module" and u.target.startswith("qtrim_sites.") for u in n.users)
    qm.graph.lint()


def test_relu_with_a_float_reader_is_kept():
    from qtrim_fx.runtime.site import QuantSite

    class SitesAsLeaves(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, QuantSite) or super().is_leaf_module(m, name)

    root = SiteAndFloatReader()
    gm = fx.GraphModule(root, SitesAsLeaves().trace(root))
    assert LeanReluPass()(gm).modified
    lean = _lean_nodes(gm)
    assert lean == ["relu_1"], gm.graph  # "relu" is also read by the add
    x = torch.randn(2, 5)
    ref = SiteAndFloatReader()
    ref.s1.observer.observe(x.relu())
    ref.s2.observer.observe((2 * x).relu())
    root.load_state_dict(ref.state_dict())
    for a, b in zip(gm(x), ref(x), strict=True):
        assert torch.equal(a, b)


def test_idempotent_and_untouched_without_sites():
    qm = qtrim_fx.prepare(Mixed())
    before = str(qm.graph)
    assert not LeanReluPass()(qm).modified and str(qm.graph) == before
    plain = fx.symbolic_trace(Mixed())  # no sites: nothing qualifies
    text = str(plain.graph)
    assert not LeanReluPass()(plain).modified and str(plain.graph) == text


def test_input_with_other_readers_is_not_swapped():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)
            self.d = nn.Conv2d(4, 4, 1)
            self.r = nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.c(x)
            return self.d(self.r(h)) + h  # inplace relu on h, which is read again: leave its semantics alone

    qm = qtrim_fx.prepare(Shared())
    assert _lean_nodes(qm) == []


def test_values_and_gradients_bit_identical():
    torch.manual_seed(0)
    model, (x,) = get_model("cifar_resnet18", width=8, batch_size=4)
    qm = qtrim_fx.prepare(model)
    assert len(_lean_nodes(qm)) == 17
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 0.6)
    ref = _without_pass(qm)
    assert _lean_nodes(ref) == []
    for m in (qm, ref):
        m.train()
    torch.manual_seed(1)
    out = qm(x)
    torch.manual_seed(1)
    out_ref = ref(x)
    assert torch.equal(out, out_ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(qm.parameters()), g)
    grads_ref = torch.autograd.grad(out_ref, list(ref.parameters()), g)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))


def test_relu_keep_mask_matches_relu_including_nan_gradients():
    x = torch.tensor([-1.0, 0.0, 2.0, float("nan"), -0.0], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")])
    ours = relu_keep_mask(x)
    ref = torch.relu(x)
    assert torch.equal(ours.nan_to_num(-7), ref.nan_to_num(-7))
    (gx,) = torch.autograd.grad(ours, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(gx.nan_to_num(-7), gr.nan_to_num(-7))
    with torch.no_grad():
        assert torch.equal(relu_keep_mask(x).nan_to_num(-7), ref.nan_to_num(-7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_relu_keep_mask_gradient_bits_match_relu(dtype):
    # Infinities, subnormals, signed zeros and negative gradients at zeroed positions: the
    # gradient must equal relu's bit for bit (+0.0 where zeroed, NaN gradients dropped there).
    tiny = torch.finfo(dtype).smallest_normal / 4
    x = torch.tensor([float("inf"), -float("inf"), tiny, -tiny, 0.0, -0.0, float("nan"), 3.0, -3.0],
                     dtype=dtype, requires_grad=True)
    g = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, float("nan"), -7.0, float("inf"), -9.0], dtype=dtype)
    (gx,) = torch.autograd.grad(relu_keep_mask(x), x, g)
    (gr,) = torch.autograd.grad(torch.relu(x), x, g)
    assert gx.dtype == gr.dtype
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float64: torch.int64}[dtype]
    assert torch.equal(gx.view(bits), gr.view(bits))


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


def test_autograd_keeps_less_memory():
    torch.manual_seed(0)
    model, (x,) = get_model("cifar_resnet18", width=8, batch_size=4)
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 1.0)
    ref = _without_pass(qm)
    qm.train()
    ref.train()
    lean, full = _saved_bytes(qm, x), _saved_bytes(ref, x)
    # 17 float ReLU outputs (4 bytes/element) become bool masks (1 byte/element).
    assert lean < 0.85 * full, (lean, full)


def test_lowering_restores_standard_relu():
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model)
    assert _lean_nodes(qm)
    qtrim_fx.calibrate(qm, [x])
    low = qtrim_fx.lower(qm)
    assert _lean_nodes(low) == [] and _lean_nodes(qm)  # the prepared model is not modified
    assert any(n.op == "call_function" and n.target is torch.relu for n in low.graph.nodes)


def test_lowering_an_unpickled_model_leaves_tracing_intact():
    # A GraphModule loaded from a pickle is re-traced, which marks fx.wrap-ped calls; restoring them to
    # torch.relu must drop the mark, or codegen registers "torch.relu" as a wrapped name for every trace.
    import io

    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    buf = io.BytesIO()
    torch.save(qm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    low = qtrim_fx.lower(loaded)
    assert torch.equal(low(x), qtrim_fx.lower(qm)(x))
    other, _ = get_model("tiny_mlp")
    fx.symbolic_trace(other)  # raised KeyError: 'torch.relu'


def test_torchscript_tracing_sees_a_plain_relu():
    # The legacy (TorchScript) ONNX exporter traces prepared models; under tracing the mask
    # function is plain torch.relu (its autograd Function and dtype views are not traceable).
    model, (x,) = get_model("cifar_resnet18", width=4, batch_size=2)
    qm = qtrim_fx.prepare(model).eval()
    assert _lean_nodes(qm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(qm, (x,), check_trace=False)
    assert "aten::relu" in str(traced.graph)
    assert torch.equal(traced(x), qm(x))


def _relu_then_scale(relu):
    def f(x: torch.Tensor) -> torch.Tensor:
        return relu(x * 1.5) * 3.0  # the ReLU output's only reader is the scale (as with a site)

    return f


def test_compiled_relu_keep_mask_matches_relu():
    x = torch.tensor([-1.0, 0.0, 2.0, float("nan"), -0.0, float("inf"), -float("inf"), 1e-40] * 4,
                     requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan"), -1.0, 5.0, 6.0] * 4)
    torch._dynamo.reset()
    out = torch.compile(_relu_then_scale(relu_keep_mask), fullgraph=True)(x)
    (gx,) = torch.autograd.grad(out, x, g)
    ref = _relu_then_scale(torch.relu)(x)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(out.nan_to_num(-7), ref.nan_to_num(-7))
    assert torch.equal(gx.nan_to_num(-7), gr.nan_to_num(-7))


def test_compiled_relu_keep_mask_saves_no_bool_mask():
    """Inductor stores a bool mask for a plain ReLU read by one op; that store is ~10x slower than eager.

    Under torch.compile relu_keep_mask's backward is one opaque op on the float output, so the
    forward kernels write no bool buffer (the plain ReLU line shows the check can fail).
    """
    from torch._inductor.utils import run_and_get_code

    def forward_code(relu) -> str:
        torch._dynamo.reset()
        x = torch.randn(4096, requires_grad=True)
        f = torch.compile(_relu_then_scale(relu), fullgraph=True)
        _, (fw, *_) = run_and_get_code(f, x)
        return fw

    assert "bool*" in forward_code(torch.relu)
    assert "bool*" not in forward_code(relu_keep_mask)


def test_restoring_relu_on_a_prepared_model_keeps_its_sites_from_writing_in_place():
    """torch.relu keeps its output for backward: after RestoreReluPass the sites that read it must not quantize it in
    place (InPlaceSitesPass marked them for the deferred ReLU's input); training the restored graph still works."""
    model, (x,) = get_model("tiny_convnet")
    qm = qtrim_fx.prepare(model)
    qtrim_fx.calibrate(qm, [x])
    qtrim_fx.set_blend(qm, 1.0)
    readers = [n for n in qm.graph.nodes if n.op == "call_module" and n.args and getattr(n.args[0], "target", None)
               is deferred_relu]
    assert any(qm.get_submodule(str(n.target)).overwrite_input for n in readers)
    ref = _without_pass(qm)
    assert not any(ref.get_submodule(str(n.target)).overwrite_input for n in readers)
    ref.train()
    ref(x).square().sum().backward()  # no "modified by an inplace operation"
