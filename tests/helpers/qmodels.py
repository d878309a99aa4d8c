"""Shared builders for tests: realistic prepared models (BN statistics warmed, sites calibrated)."""

from __future__ import annotations

import torch
from torch import nn

import qtrim_fx


@torch.no_grad()
def warm_batchnorm(model: nn.Module, batches: list) -> None:
    """Give random-init BatchNorms the running statistics of real activations (momentum 1 pass).

    Random-init torchvision nets in eval mode often shrink activations to ~1e-9 because
    running_var is 1; a trained net has normalized activations. Each BN takes the statistics
    of the last batch it sees.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    was = model.training
    model.eval()
    for m in bns:
        m.momentum = 1.0
        m.train()
    for b in batches:
        model(*b) if isinstance(b, tuple) else model(b)
    for m, (mom, tr) in zip(bns, saved, strict=True):
        m.momentum = mom
        m.training = tr
    model.train(was)


def calibrated(model: nn.Module, batches: list, config: qtrim_fx.QuantConfig | None = None, lam: float = 1.0):
    """prepare + warm BN + calibrate + set λ, in eval mode."""
    warm_batchnorm(model, batches)
    qm = qtrim_fx.prepare(model, config=config)
    qtrim_fx.calibrate(qm, batches)
    qtrim_fx.set_blend(qm, lam)
    return qm.eval()


def train_on_digits(
    model: nn.Module, epochs: int = 2, size: int = 32, lr: float = 1e-3, seed: int = 0, max_steps: int | None = None
):
    """A short real training run on scikit-learn's digits; returns (model in eval, test images, labels).

    Random-init networks on white noise give near-tied logits and amplify every rounding flip;
    a briefly trained network is the realistic thing to compare runtimes on.
    """
    from qtrim_fx.models.data import digits_loaders

    torch.manual_seed(seed)
    train, test = digits_loaders(batch_size=64, size=size, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    steps = 0
    for _ in range(epochs):
        for xb, yb in train:
            if max_steps is not None and steps >= max_steps:
                break
            steps += 1
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    xs, ys = next(iter(test))
    calib = [xb for xb, _ in list(train)[:4]]
    return model.eval(), calib, xs, ys


class SignGate(nn.Module):
    """Data-dependent Python control flow (a branch on a tensor's value): symbolic tracing cannot see through it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def image_batch(seed: int = 1) -> tuple[torch.Tensor]:
    """A seeded (2, 3, 8, 8) input, as a one-tuple of model inputs."""
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed)),)


def activation_site_ops(qm: nn.Module) -> dict[str, str]:
    """``{site name: op kind}`` of a prepared model's activation sites."""
    from qtrim_fx.runtime.prepared import iter_sites

    return {s.name: s.op for s, _, _ in iter_sites(qm) if s.kind == "activation"}


def decomposed_activations(qm: nn.Module, product: object) -> list[str]:
    """The activation names passed to every ``product`` node (``gate_product``, ``gelu_product``) of ``qm``."""
    return [n.args[2] for n in qm.graph.nodes if n.target is product]


def assert_exact_at_lambda_0(model: nn.Module, qm: nn.Module, x: torch.Tensor) -> None:
    """At λ = 0 the prepared model is the float one bit for bit, in value and input gradient, in eval and train
    mode; at λ = 1 (eval) it differs (what the file computes). Leaves ``qm`` at λ = 1 in eval mode."""
    qtrim_fx.set_blend(qm, 0.0)
    for training in (False, True):
        model.train(training), qm.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = model(xa), qm(xb)
        assert torch.equal(ya, yb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert torch.equal(xa.grad, xb.grad)
    qtrim_fx.set_blend(qm, 1.0)
    qm.eval()
    assert not torch.equal(qm(x), model.eval()(x))
