"""Gradient stability of train-mode Quant-Trim on depthwise-separable nets (issue 19).

For each model: random init, BatchNorm statistics warmed by 20 train-mode forwards of the float model,
``qtrim_fx.prepare``, ``qtrim_fx.calibrate`` on 4 other batches (eval mode, as documented for PTQ and
before training), then, in train mode on one more batch (cross-entropy, fixed targets, the same dropout
draw at every λ), the parameter-gradient norm at λ = 0 / 0.2 / 1 for

* ``identity STE``: the blend's former backward (gradient 1 everywhere; kept here only as the baseline),
* ``clipped STE``: today's blend backward, ``(1 − λ) + λ·1[lo < x̃ < hi]``,

under three warm-ups:

* ``train-mode stats``: ``qtrim_fx.prepare`` first, then the 20 warm-up forwards run through the
  prepared model in train mode at λ = 0, so BatchNorm's running statistics and the sites' statistics
  warm together on train-mode activations — what the curriculum's λ = 0 phase does in a real run
  (the acceptance protocol of issue 19: "BatchNorm statistics warmed by 20 train-mode forwards");
* ``momentum 0.1``: the float model warmed at the default momentum, then sites calibrated in eval
  mode; after 20 forwards the running variance still holds 0.9^20 = 12 % of its initial 1.0, so
  eval-mode activations (the calibrated ranges) are far narrower than train-mode ones — a stale-BN
  mismatch, kept as the stress case;
* ``converged``: ``momentum=None`` during the float warm-up (cumulative average: the running
  statistics equal the warm-up data's, as in a trained net), then eval-mode calibration.

Usage::

    python benchmarks/grad_stability.py                 # the six acceptance models, writes RESULTS.md
    python benchmarks/grad_stability.py --quick --no-write

Writes (replaces) the section "## Gradient stability (issue 19)" of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import qtrim_fx
from qtrim_fx.runtime import site as site_module
from qtrim_fx.runtime.blend import BlendQuantFn
from qtrim_fx.runtime.prepared import set_blend
from qtrim_fx.runtime.site import QuantSite

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from _common import machine, write_section

LAMBDAS = (0.0, 0.2, 1.0)
MODELS = ("mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "mobilenet_v3_small", "regnet_y_400mf",
          "ghostnet_100")


class _IdentitySTE(BlendQuantFn):
    """The former blend backward (identity for every λ): the baseline column only."""

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        return (grad, *(None,) * (len(ctx.needs_input_grad) - 1))


def _block(c_in: int, c_out: int, expand: int, stride: int) -> nn.Sequential:
    mid = c_in * expand
    return nn.Sequential(
        nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
        nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
        nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


def tiny_depthwise_net(num_classes: int = 10) -> nn.Module:
    """A small MobileNetV2-style stack (stem, four depthwise-separable blocks, linear head)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        _block(16, 16, 4, 1), _block(16, 24, 4, 2), _block(24, 24, 4, 1), _block(24, 32, 4, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "tiny_depthwise":
        return tiny_depthwise_net()
    if name == "ghostnet_100":
        import timm
        return timm.create_model(name, num_classes=10)
    import torchvision
    return getattr(torchvision.models, name)(num_classes=10)


def warm_batchnorm(model: nn.Module, batches: list[torch.Tensor], converged: bool) -> None:
    """Train-mode forwards of the float model; ``converged``: cumulative averages (momentum=None)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    if converged:
        for m in bns:
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    for m, mu in zip(bns, saved, strict=True):
        m.momentum = mu


WARMUPS = {"train": "train-mode stats", "momentum": "momentum 0.1", "converged": "converged"}


def grad_norms(name: str, converged: bool | str, size: int, batch: int) -> dict[str, list[float]]:
    """{STE: [grad norm at each λ]} for one model and one warm-up (``"train"``, or ``converged``
    True/False for the float warm-up followed by eval-mode calibration)."""
    def data(i: int) -> torch.Tensor:
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(i))

    model = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if converged == "train":
            qm = qtrim_fx.prepare(model, (data(0),))
            qm.train()
            set_blend(qm, 0.0)
            with torch.no_grad():
                for i in range(20):
                    qm(data(i))
        else:
            warm_batchnorm(model, [data(i) for i in range(20)], bool(converged))
            qm = qtrim_fx.prepare(model, (data(0),))
            qtrim_fx.calibrate(qm, [data(100 + i) for i in range(4)])
    x, y = data(1000), torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1))
    state = copy.deepcopy(qm.state_dict())
    qm.train()
    out: dict[str, list[float]] = {}
    # The identity STE replaces BlendQuantFn; the in-place λ = 1 path (native autograd, the clipped STE's
    # backward, see InPlaceSitesPass) would bypass it, so the baseline runs without that path.
    owned = {site: site.overwrite_input for site in qm.modules() if isinstance(site, QuantSite)}
    for label, fn in (("identity STE", _IdentitySTE), ("clipped STE", BlendQuantFn)):
        site_module.BlendQuantFn = fn
        for site, flag in owned.items():
            site.overwrite_input = flag and fn is BlendQuantFn
        try:
            out[label] = [_one_grad(qm, state, x, y, lam) for lam in LAMBDAS]
        finally:
            site_module.BlendQuantFn = BlendQuantFn
            for site, flag in owned.items():
                site.overwrite_input = flag
    return out


def _one_grad(qm: nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor, lam: float) -> float:
    qm.load_state_dict(state)
    set_blend(qm, lam)
    qm.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout draw at every λ
    nn.functional.cross_entropy(qm(x), y).backward()
    sq = [p.grad.double().pow(2).sum() for p in qm.parameters() if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt())


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v == v and abs(v) < 1e4 else f"{v:.2g}"


def table(rows: list[tuple[str, str, str, list[float]]]) -> str:
    lines = ["| model | BN warm-up | STE | λ=0 | λ=0.2 | λ=1 | λ=1 / λ=0 |", "|---|---|---|---|---|---|---|"]
    for model, warm, ste, g in rows:
        lines.append(f"| {model} | {warm} | {ste} | " + " | ".join(_fmt(v) for v in g) + f" | {_fmt(g[2] / g[0])} |")
    return "\n".join(lines)


def acceptance(rows: list[tuple[str, str, str, list[float]]]) -> str:
    """Issue 19's criterion on the train-mode-stats rows of today's (clipped) STE: λ=1 within 3× of λ=0."""
    mine = [(m, g[2] / g[0]) for m, warm, ste, g in rows if warm == WARMUPS["train"] and ste == "clipped STE"]
    if not mine:
        return "Acceptance (train-mode stats, clipped STE, λ=1 / λ=0 ≤ 3): not run."
    worst = max(mine, key=lambda r: r[1])
    verdict = "MET" if all(r <= 3 for _, r in mine) else "NOT MET"
    return (f"Acceptance (train-mode stats, clipped STE, λ=1 / λ=0 ≤ 3 on {len(mine)} models): {verdict}; "
            f"worst {worst[0]} {worst[1]:.2f}×.")


def main(argv: list[str] | None = None, progress: Callable[[str], None] = print) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small depthwise net, 32x32 inputs, momentum 0.1 and train-mode stats")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmups", default="train,momentum,converged",
                    help="warm-ups to run: train (the acceptance protocol), momentum, converged")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    names = ["tiny_depthwise"] if args.quick else args.models.split(",")
    size, batch = (32, 16) if args.quick else (args.size, args.batch)
    rows = []
    for name in names:
        for key in ("momentum", "train") if args.quick else args.warmups.split(","):
            warm = WARMUPS[key]
            converged: bool | str = "train" if key == "train" else key == "converged"
            for ste, g in grad_norms(name, converged, size, batch).items():
                rows.append((name, warm, ste, g))
                progress(f"{name:20s} {warm:12s} {ste:12s} " + " ".join(_fmt(v) for v in g))
    text = table(rows)
    print(text)
    if not args.no_write:
        cmd = "python benchmarks/grad_stability.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:]))
        body = (f"Command: `{cmd.strip()}`  \nMachine: {machine()}  \n"
                f"Random init, inputs randn {batch}×3×{size}×{size}, `QuantConfig()` defaults, 20 warm-up forwards "
                "(train-mode stats: through the prepared model at λ = 0; the other two: the float model, then "
                "`qtrim_fx.calibrate` on 4 batches in eval mode), then train mode, cross-entropy, one batch; "
                "parameter-gradient L2 norm.\n\n" + text + "\n\n" + acceptance(rows))
        write_section("Gradient stability (issue 19)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
