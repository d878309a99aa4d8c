"""Reference model factories and the digits data set."""

from __future__ import annotations

import pytest
import qtrim_fx.models as models
import torch
import torch.fx
from qtrim_fx.models import MODELS, get_model
from qtrim_fx.models.data import DIGITS_MAX, DIGITS_MIN, digits_dataset, digits_loaders
from torch import nn

EXPECTED_OUTPUT_SHAPES = {
    "tiny_convnet": (2, 10),
    "tiny_mlp": (2, 10),
    "attention_block": (2, 16, 32),
    "convtranspose_net": (2, 3, 16, 16),
    "cifar_resnet18": (2, 10),
    "mobilenet_small": (2, 10),
    "vit_tiny": (2, 10),
    "vit_tiny_sdpa": (2, 10),
    "vit_tiny_mha": (2, 10),
    "tv_resnet18": (1, 1000),
    "tv_mobilenet_v3_small": (1, 1000),
    "tv_vit_b_16": (1, 1000),
}
SMALL = [n for n in EXPECTED_OUTPUT_SHAPES if not n.startswith("tv_")]
# Smaller images keep the torchvision CNNs fast; ViT-B/16 needs its 224x224 positional embedding.
TV_KWARGS = {
    "tv_resnet18": {"image_size": 64},
    "tv_mobilenet_v3_small": {"image_size": 64},
    "tv_vit_b_16": {},
}


def test_registry_lists_every_expected_model():
    assert set(MODELS) == set(EXPECTED_OUTPUT_SHAPES)


@pytest.mark.parametrize("name", SMALL)
def test_factory_forward_shape_and_trace(name):
    model, example_inputs = get_model(name)
    assert isinstance(model, nn.Module) and not model.training
    assert isinstance(example_inputs, tuple) and all(isinstance(t, torch.Tensor) for t in example_inputs)
    with torch.no_grad():
        out = model(*example_inputs)
    assert tuple(out.shape) == EXPECTED_OUTPUT_SHAPES[name]
    assert torch.isfinite(out).all()
    gm = torch.fx.symbolic_trace(model)
    gm.graph.lint()
    with torch.no_grad():
        torch.testing.assert_close(gm(*example_inputs), out)


@pytest.mark.parametrize("name", SMALL)
def test_factory_is_deterministic_and_leaves_global_rng_alone(name):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    m1, x1 = get_model(name)
    assert torch.equal(torch.random.get_rng_state(), before)
    m2, x2 = get_model(name)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(x1, x2, strict=True))
    m3, _ = get_model(name, seed=1)
    assert any(
        not torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values(), strict=True)
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tv_resnet18", "tv_mobilenet_v3_small", "tv_vit_b_16"])
def test_torchvision_factories(name):
    pytest.importorskip("torchvision")
    model, example_inputs = get_model(name, **TV_KWARGS[name])
    with torch.no_grad():
        out = model(*example_inputs)
    assert tuple(out.shape) == EXPECTED_OUTPUT_SHAPES[name]
    torch.fx.symbolic_trace(model).graph.lint()


def test_factory_keyword_arguments():
    model, (x,) = get_model("cifar_resnet18", width=8, num_classes=5, in_channels=1, batch_size=3)
    assert tuple(x.shape) == (3, 1, 32, 32)
    assert tuple(model(x).shape) == (3, 5)
    assert model.conv1.out_channels == 8 and model.layer4[0].conv1.out_channels == 64
    wide, _ = get_model("mobilenet_small", width_mult=1.0)
    narrow, _ = get_model("mobilenet_small")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(wide) > 4 * count(narrow)


def test_unknown_model_lists_known_names():
    with pytest.raises(KeyError, match="tiny_convnet") as info:
        get_model("resnet9000")
    assert "resnet9000" in str(info.value)


def test_model_structure():
    resnet, _ = get_model("cifar_resnet18")
    convs = [m for m in resnet.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in resnet.modules())
    assert [len(getattr(resnet, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    mobilenet, _ = get_model("mobilenet_small")
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in mobilenet.modules())
    assert any(isinstance(m, nn.ReLU6) for m in mobilenet.modules())
    assert any(isinstance(m, nn.ConvTranspose2d) for m in get_model("convtranspose_net")[0].modules())


@pytest.mark.parametrize(
    ("name", "targets"),
    [
        ("vit_tiny", {"softmax", "matmul"}),
        ("vit_tiny_sdpa", {"scaled_dot_product_attention"}),
        ("vit_tiny_mha", {"mha"}),
        ("attention_block", {"softmax", "matmul"}),
    ],
)
def test_attention_forms_are_visible_in_the_fx_graph(name, targets):
    model, _ = get_model(name)
    gm = torch.fx.symbolic_trace(model)
    seen = set()
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        seen.add(target.split(".")[-1])
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
            seen.add("mha")
    assert targets <= seen
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears, "projections must be nn.Linear"


def test_vit_attention_variants_agree_on_shared_weights():
    manual, (x,) = get_model("vit_tiny")
    sdpa, _ = get_model("vit_tiny_sdpa")
    sdpa.load_state_dict(manual.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x), manual(x), rtol=1e-4, atol=1e-5)


def test_digits_split_sizes_and_stratification():
    train, test = digits_dataset()
    assert len(train) == 1347 and len(test) == 450
    x, y = train.tensors
    assert x.shape == (1347, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    counts = torch.bincount(test.tensors[1], minlength=10)
    assert counts.min() >= 43 and counts.max() <= 46  # stratified: 450 / 10 classes
    assert torch.equal(x[:, 0], x[:, 2])


def test_digits_determinism_and_seed():
    a_train, a_test = digits_dataset(size=16, channels=1)
    b_train, b_test = digits_dataset(size=16, channels=1)
    for a, b in zip(a_train.tensors + a_test.tensors, b_train.tensors + b_test.tensors, strict=True):
        assert torch.equal(a, b)
    c_train, _ = digits_dataset(size=16, channels=1, seed=1)
    assert not torch.equal(a_train.tensors[1], c_train.tensors[1])


def test_digits_value_range_and_normalization():
    train, test = digits_dataset(size=8, channels=1)
    x = torch.cat([train.tensors[0], test.tensors[0]])
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1.0) < 1e-3
    big, _ = digits_dataset(size=32)
    assert big.tensors[0].min() >= DIGITS_MIN - 1e-5 and big.tensors[0].max() <= DIGITS_MAX + 1e-5
    assert big.tensors[0].min() < -0.8 and big.tensors[0].max() > 1.8


def test_digits_loaders_are_deterministic():
    train_loader, test_loader = digits_loaders(batch_size=100, size=8)
    first = [y for _, y in train_loader]
    again = [y for _, y in digits_loaders(batch_size=100, size=8)[0]]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert sum(len(y) for y in first) == 1347
    assert sum(len(y) for _, y in test_loader) == 450


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="test_fraction"):
        digits_dataset(test_fraction=1.5)


def test_models_package_exports():
    assert callable(models.get_model) and "vit_tiny_mha" in models.MODELS
