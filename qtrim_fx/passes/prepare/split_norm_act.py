"""SplitNormActPass: a BatchNorm subclass that is BatchNorm followed by its own child modules becomes
a plain BatchNorm call and calls of those children — when that is *verified* to compute the same.

timm's ``BatchNormAct2d`` (efficientnets, mobilenetv3, regnets, mobilevitv2 ...) is a ``BatchNorm2d``
whose ``forward`` also applies its ``drop`` and ``act`` children. Left as one leaf, the BatchNorm cannot
be folded into the convolution before it (``is_plain_batchnorm`` refuses: folding would drop the
activation), so every such block deploys as ``Conv -> Q/DQ -> BatchNormalization -> act -> Q`` with a
float BatchNormalization: an extra rounding on the conv output, and a float op an integer-only target
(QNN HTP, NPUs) runs in FLOAT_32 or refuses. This pass rewrites::

    before:  y = call_module[blocks.0.bn1](x)                       (BatchNormAct2d: BN, drop, act)

    after:   b = call_module[qtrim_norm.blocks_0_bn1](x)            (plain BatchNorm2d sharing the
             d = call_module[blocks.0.bn1.drop](b)                   module's weight, bias and running
             y = call_module[blocks.0.bn1.act](d)                    buffers: same tensors, same updates)

so the ordinary conv -> BatchNorm fold and the activation's own site apply. The rewrite is taken only
when it is proven on the module itself: on a seeded random input of the module's rank, in eval mode
(outputs equal bit for bit) and in train mode on two copies (outputs, running mean/var and the batch
counter equal bit for bit, same dropout draw). Anything else — another order, extra arithmetic, a child
skipped, a 1-D/3-D module whose rank is unknown — keeps today's single leaf. Nothing is added to the
user's modules: the plain BatchNorms live under ``qtrim_norm`` on the GraphModule.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from qtrim_fx.core.modules import is_plain_batchnorm
from qtrim_fx.passes.base import GraphPass, PassResult, finish

__all__ = ["SharedBatchNorm1d", "SharedBatchNorm2d", "SharedBatchNorm3d", "SplitNormActPass"]

_ROOT = "qtrim_norm"


class _SharedState:
    """Mixin: a BatchNorm whose tensors belong to another module, which alone saves and loads them
    (the prepared model's ``state_dict`` keeps exactly the user's keys, so checkpoints are unchanged)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        pass


class SharedBatchNorm1d(_SharedState, nn.BatchNorm1d):
    """Plain ``BatchNorm1d`` over another module's parameters and buffers."""


class SharedBatchNorm2d(_SharedState, nn.BatchNorm2d):
    """Plain ``BatchNorm2d`` over another module's parameters and buffers."""


class SharedBatchNorm3d(_SharedState, nn.BatchNorm3d):
    """Plain ``BatchNorm3d`` over another module's parameters and buffers."""


#: (base class, plain class over shared tensors, rank of the verification input).
_PLAIN = ((nn.BatchNorm2d, SharedBatchNorm2d, 4), (nn.BatchNorm1d, SharedBatchNorm1d, 3),
          (nn.BatchNorm3d, SharedBatchNorm3d, 5))


def _plain_of(module: nn.modules.batchnorm._BatchNorm) -> tuple[type, int] | None:
    for base, cls, rank in _PLAIN:
        if isinstance(module, base):
            return cls, rank
    return None


def _plain_sharing(module: nn.modules.batchnorm._BatchNorm, cls: type) -> nn.Module:
    """A ``cls`` (plain BatchNorm) holding ``module``'s very parameters and buffers (no copies)."""
    plain = cls(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                track_running_stats=module.track_running_stats, device="meta")
    for name in ("weight", "bias"):
        setattr(plain, name, getattr(module, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        plain.register_buffer(name, getattr(module, name))
    plain.train(module.training)
    return plain


def _chain(plain: nn.Module, children: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    y = plain(x)
    for child in children:
        y = child(y)
    return y


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _decomposes(module: nn.modules.batchnorm._BatchNorm, cls: type, rank: int) -> bool:
    """``module(x) == children(plain_bn(x))`` in eval and train mode (outputs and buffer updates)."""
    p = next(iter(module.parameters()), module.running_mean)
    if p is None or p.device.type == "meta":
        return False
    shape = (3, module.num_features) + (3,) * (rank - 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=p.device, dtype=p.dtype)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for training in (False, True):
                a, b = copy.deepcopy(module).train(training), copy.deepcopy(module).train(training)
                torch.manual_seed(0)
                ya = a(x)
                torch.manual_seed(0)
                yb = _chain(_plain_sharing(b, cls), list(b.children()), x)
                if not isinstance(ya, torch.Tensor) or not _same(ya, yb):
                    return False
                for buf in ("running_mean", "running_var", "num_batches_tracked"):
                    if not _same(getattr(a, buf), getattr(b, buf)):
                        return False
    except Exception:  # a module that does not run on this input is simply not split
        return False
    return True


def _candidate(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, type] | None:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    m = gm.get_submodule(str(node.target))
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or is_plain_batchnorm(m) or not list(m.children()):
        return None
    if m.running_mean is None or m.running_var is None:
        return None
    found = _plain_of(m)
    if found is None or not _decomposes(m, *found):
        return None
    return m, found[0]


class SplitNormActPass(GraphPass):
    """Split verified BatchNorm+children modules into a plain BatchNorm and child calls (see the module doc)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        plains: dict[str, str] = {}
        for node in list(gm.graph.nodes):
            target = str(node.target) if node.op == "call_module" else ""
            if target.startswith(_ROOT + "."):
                continue
            found = _candidate(gm, node) if target not in plains else (gm.get_submodule(target), None)
            if found is None:
                continue
            module, cls = found
            if target not in plains:
                plains[target] = f"{_ROOT}.{target.replace('.', '_')}"
                gm.add_submodule(plains[target], _plain_sharing(module, cls))
            with gm.graph.inserting_before(node):
                y = gm.graph.call_module(plains[target], node.args)
                stack = {k: v for k, v in node.meta.items() if k == "nn_module_stack"}
                y.meta.update(stack)
                for child_name, _ in module.named_children():
                    y = gm.graph.call_module(f"{target}.{child_name}", (y,))
                    y.meta.update(stack)
            node.replace_all_uses_with(y)
            gm.graph.erase_node(node)
            modified = True
        return finish(gm, modified)
