"""The torchvision classification zoo, unchanged code: prepare, exact FP32 at λ = 0, one QAT step at λ = 1.

The model is prepared in eval mode; λ = 0 must give the model's outputs bit for bit in eval
mode and, with the same RNG seed, in train mode (BatchNorm batch statistics, dropout and
stochastic depth follow ``qm.train()``, not the mode the model was captured in).

Inputs are the smallest each model handles comfortably (batch 2): 32x32 for the CNNs,
75x75 for inception_v3 (its minimum), 224x224 where the architecture fixes it (ViT-B/16
positional embedding, MaxViT's window/grid partition).

The λ = 0 comparison runs with autograd enabled, not under ``torch.no_grad()``: in eval
mode without grad, ``nn.MultiheadAttention`` (vit_b_16) takes PyTorch's fused inference
fast path, which differs from its reference path by float rounding (~1e-7). The prepared
model traces ``nn.MultiheadAttention`` through that reference path (so its projections
carry sites), and reproduces it bit for bit.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import qtrim_fx

tvm = pytest.importorskip("torchvision.models")

BATCH = 2
# name -> (constructor kwargs, image size)
ZOO: dict[str, tuple[dict, int]] = {
    "resnet18": ({}, 32),
    "resnet50": ({}, 32),
    "mobilenet_v2": ({}, 32),
    "mobilenet_v3_small": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "regnet_x_400mf": ({}, 32),
    "shufflenet_v2_x1_0": ({}, 32),
    "squeezenet1_0": ({}, 32),
    "densenet121": ({}, 32),
    "convnext_tiny": ({}, 32),
    "swin_t": ({}, 32),
    "vit_b_16": ({}, 224),
    "maxvit_t": ({}, 224),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 32),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 75),
}


def _build(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    kwargs, size = ZOO[name]
    torch.manual_seed(0)
    model = getattr(tvm, name)(weights=None, **kwargs)
    x = torch.randn(BATCH, 3, size, size)
    x2 = torch.randn(BATCH, 3, size, size)
    return model, x, x2


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_prepare_exact_then_qat_step(name, record_property):
    t0 = time.perf_counter()
    model, x, x2 = _build(name)
    model.eval()
    qm = qtrim_fx.prepare(model)

    info = qm.qtrim_info
    assert info.frontend == "symbolic_trace"
    assert info.fallbacks == ()
    # Parameters are shared with the model, not copied: the λ = 0 check below compares the same weights.
    model_params = {id(p) for p in model.parameters()}
    assert {id(p) for p in qm.parameters()} <= model_params
    assert any(spec.kind == "weight" for spec, _, _ in qtrim_fx.iter_sites(qm))

    qm.eval()
    with torch.enable_grad():  # see the module docstring: no-grad MHA uses a fused fast path
        ref = model(x)
        out = qm(x)
    assert torch.equal(ref, out), f"{name}: max |diff| = {(ref - out).abs().max().item()}"
    # train(): stochastic depth / dropout are live again and draw the same random numbers as the model
    model.train()
    qm.train()
    torch.manual_seed(1)
    ref = model(x)
    torch.manual_seed(1)
    assert torch.equal(ref, qm(x)), f"{name} in train mode"

    assert qtrim_fx.calibrate(qm, [x, x2]) == 2
    qtrim_fx.set_blend(qm, 1.0)
    qm.train()
    opt = torch.optim.SGD(qm.parameters(), lr=1e-3)
    opt.zero_grad()
    labels = torch.randint(0, 1000, (BATCH,))
    loss = F.cross_entropy(qm(x), labels)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    grads = [p.grad for p in qm.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    record_property("seconds", round(time.perf_counter() - t0, 2))
