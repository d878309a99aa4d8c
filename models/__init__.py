"""Reference models for tests and benchmarks, behind one registry.

Every factory returns ``(module, example_inputs)``: the module is built from a fixed seed (the global
RNG is left untouched) and returned in ``eval()`` mode, so forward passes are deterministic; call
``.train()`` before training or collecting statistics. ``example_inputs`` is a tuple of tensors for
``module(*example_inputs)``, also seeded. Every model passes ``torch.fx.symbolic_trace``.

>>> model, example_inputs = get_model("tiny_convnet")
>>> model(*example_inputs).shape
torch.Size([2, 10])

Factories take keyword arguments: ``batch_size`` and ``seed`` everywhere, plus the model's own
(``num_classes``, ``in_channels``, ``width``, ``image_size`` ...). torchvision models are imported
lazily and built with ``weights=None`` (random init, no download).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .blocks import AttentionBlock, ConvTransposeNet, TinyConvNet, TinyMLP
from .cifar_resnet import CifarResNet, cifar_resnet18
from .mobilenet import MobileNetV2
from .vit import VisionTransformer

__all__ = [
    "MODELS",
    "AttentionBlock",
    "CifarResNet",
    "ConvTransposeNet",
    "MobileNetV2",
    "TinyConvNet",
    "TinyMLP",
    "VisionTransformer",
    "cifar_resnet18",
    "get_model",
]

Factory = Callable[..., tuple[nn.Module, tuple]]


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))


def _tiny_convnet(
    *,
    batch_size: int = 2,
    seed: int = 0,
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 8,
    image_size: int = 16,
) -> tuple[nn.Module, tuple]:
    model = _seeded(lambda: TinyConvNet(in_channels, num_classes, width), seed)
    return model, (_randn(batch_size, in_channels, image_size, image_size, seed=seed),)


def _tiny_mlp(
    *, batch_size: int = 2, seed: int = 0, in_features: int = 64, hidden: int = 32, num_classes: int = 10
) -> tuple[nn.Module, tuple]:
    model = _seeded(lambda: TinyMLP(in_features, hidden, num_classes), seed)
    return model, (_randn(batch_size, in_features, seed=seed),)


def _attention_block(
    *,
    batch_size: int = 2,
    seed: int = 0,
    dim: int = 32,
    num_heads: int = 4,
    tokens: int = 16,
    mlp_ratio: float = 2.0,
) -> tuple[nn.Module, tuple]:
    model = _seeded(lambda: AttentionBlock(dim, num_heads, mlp_ratio), seed)
    return model, (_randn(batch_size, tokens, dim, seed=seed),)


def _convtranspose_net(
    *,
    batch_size: int = 2,
    seed: int = 0,
    in_channels: int = 3,
    width: int = 8,
    out_channels: int = 3,
    image_size: int = 16,
) -> tuple[nn.Module, tuple]:
    model = _seeded(lambda: ConvTransposeNet(in_channels, width, out_channels), seed)
    return model, (_randn(batch_size, in_channels, image_size, image_size, seed=seed),)


def _cifar_resnet18(
    *,
    batch_size: int = 2,
    seed: int = 0,
    width: int = 16,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
) -> tuple[nn.Module, tuple]:
    model = _seeded(lambda: cifar_resnet18(width, num_classes, in_channels), seed)
    return model, (_randn(batch_size, in_channels, image_size, image_size, seed=seed),)


def _mobilenet_small(
    *,
    batch_size: int = 2,
    seed: int = 0,
    width_mult: float = 0.35,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    stem_stride: int = 1,
) -> tuple[nn.Module, tuple]:
    model = _seeded(lambda: MobileNetV2(num_classes, in_channels, width_mult, stem_stride), seed)
    return model, (_randn(batch_size, in_channels, image_size, image_size, seed=seed),)


def _vit_factory(attention: str) -> Factory:
    def factory(
        *,
        batch_size: int = 2,
        seed: int = 0,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> tuple[nn.Module, tuple]:
        model = _seeded(
            lambda: VisionTransformer(
                image_size,
                patch_size,
                in_channels,
                num_classes,
                dim,
                depth,
                num_heads,
                mlp_ratio,
                attention,  # type: ignore[arg-type]
            ),
            seed,
        )
        return model, (_randn(batch_size, in_channels, image_size, image_size, seed=seed),)

    factory.__doc__ = f"Small ViT with attention={attention!r}; returns (module, example_inputs)."
    return factory


def _torchvision_factory(name: str, default_size: int) -> Factory:
    def factory(
        *,
        batch_size: int = 1,
        seed: int = 0,
        num_classes: int = 1000,
        image_size: int = default_size,
        **kwargs,
    ) -> tuple[nn.Module, tuple]:
        try:
            import torchvision
        except ImportError as e:  # pragma: no cover - torchvision is a dev dependency
            raise ImportError(f"model {name!r} needs torchvision: pip install torchvision") from e
        build = getattr(torchvision.models, name)
        if name.startswith("vit"):
            kwargs.setdefault("image_size", image_size)
        model = _seeded(lambda: build(weights=None, num_classes=num_classes, **kwargs), seed)
        return model, (_randn(batch_size, 3, image_size, image_size, seed=seed),)

    factory.__doc__ = f"torchvision.models.{name}(weights=None), seeded; returns (module, example_inputs)."
    return factory


MODELS: dict[str, Factory] = {
    "tiny_convnet": _tiny_convnet,
    "tiny_mlp": _tiny_mlp,
    "attention_block": _attention_block,
    "convtranspose_net": _convtranspose_net,
    "cifar_resnet18": _cifar_resnet18,
    "mobilenet_small": _mobilenet_small,
    "vit_tiny": _vit_factory("manual"),
    "vit_tiny_sdpa": _vit_factory("sdpa"),
    "vit_tiny_mha": _vit_factory("mha"),
    "tv_resnet18": _torchvision_factory("resnet18", 224),
    "tv_mobilenet_v3_small": _torchvision_factory("mobilenet_v3_small", 224),
    "tv_vit_b_16": _torchvision_factory("vit_b_16", 224),
}
"""Model name -> factory returning ``(module in eval mode, example_inputs tuple)``."""


def get_model(name: str, **kwargs) -> tuple[nn.Module, tuple]:
    """Build a registered model and example inputs for it.

    Args:
        name: a key of :data:`MODELS`, e.g. ``"tiny_convnet"``, ``"vit_tiny_sdpa"``, ``"tv_resnet18"``.
        **kwargs: passed to the factory (``batch_size``, ``seed``, ``num_classes``, ``width`` ...).

    Returns:
        ``(module, example_inputs)``: the module in eval mode and a tuple of input tensors.

    Raises:
        KeyError: ``name`` is not registered (the message lists the known names).
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
    return factory(**kwargs)
