"""Module predicates shared by the stages: which modules are exactly what a pass assumes."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["is_parametrized_attr", "is_plain_batchnorm", "is_plain_module", "is_plain_weighted"]

#: ``forward`` methods of torch's own BatchNorm classes (BatchNorm1d/2d/3d and the lazy ones inherit
#: ``_BatchNorm.forward``; SyncBatchNorm has its own).
_PLAIN_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def is_plain_batchnorm(module: object) -> bool:
    """Whether ``module`` computes exactly BatchNorm with running statistics, nothing more.

    A subclass that overrides ``forward`` (timm's ``BatchNormAct2d`` adds an activation and dropout)
    is not, nor is one with forward hooks or pre-hooks: folding it into a conv would drop what its forward
    or hooks add. Such modules stay in the graph.
    """
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and type(module).forward in _PLAIN_BN_FORWARDS
        and module.running_var is not None
        and module.running_mean is not None
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


#: torch's own weighted layers and the methods their forward runs: a module is functionalized (its call
#: rewritten as ``F.conv2d``/``F.linear`` on its parameters) only when it runs exactly these.
_PLAIN_WEIGHTED: tuple[tuple[type, tuple[str, ...]], ...] = (
    (nn.Linear, ("forward",)),
    (nn.Conv1d, ("forward", "_conv_forward")),
    (nn.Conv2d, ("forward", "_conv_forward")),
    (nn.Conv3d, ("forward", "_conv_forward")),
    (nn.ConvTranspose1d, ("forward",)),
    (nn.ConvTranspose2d, ("forward",)),
    (nn.ConvTranspose3d, ("forward",)),
)


def is_plain_weighted(module: object) -> bool:
    """Whether ``module`` is a Linear / Conv / ConvTranspose that computes exactly torch's op on its own parameters.

    Not plain (so its call must stay a module call): a subclass that overrides ``forward`` or
    ``_conv_forward`` (timm's ``Conv2dSame`` pads from the input size, weight-standardized convs
    normalize the weight first), a module with forward hooks or pre-hooks (``spectral_norm`` and the
    old ``weight_norm`` recompute ``weight`` in a pre-hook), or one whose ``weight`` is neither a registered
    parameter nor a ``parametrize`` parametrization (read live by a ``get_attr``, quantized as computed).
    Rewriting those as ``F.conv2d(x, weight, ...)`` would silently drop what they add; kept as module calls,
    their weights are reported as float.
    """
    if not isinstance(module, nn.Module):
        return False
    cls = type(module)
    for base, methods in _PLAIN_WEIGHTED:
        if isinstance(module, base):
            if any(getattr(cls, m) is not getattr(base, m) for m in methods):
                return False
            break
    else:
        return False
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    return all(
        _registered(module, name) for name in ("weight", "bias"))


def _registered(module: nn.Module, name: str) -> bool:
    """``module.<name>`` is absent, None, the parameter registered under that name, or a ``parametrize``
    parametrization (recomputed on every read, so a ``get_attr`` of it stays exact; its site quantizes the
    computed weight); not a value a hook wrote."""
    if parametrize.is_parametrized(module, name):
        return True
    value = getattr(module, name, None)
    return value is None or module._parameters.get(name) is value


def is_parametrized_attr(root: nn.Module, target: str) -> bool:
    """``root.<target>`` (a dotted path) is a ``torch.nn.utils.parametrize`` parametrized tensor."""
    owner, _, name = target.rpartition(".")
    try:
        module = root.get_submodule(owner) if owner else root
    except AttributeError:
        return False
    return parametrize.is_parametrized(module, name)


def is_plain_module(module: object, base: type[nn.Module]) -> bool:
    """Whether calling ``module`` runs exactly ``base.forward``: an instance of ``base`` whose class does not
    override ``forward`` (timm's ``LayerNorm2d`` permutes around its ``layer_norm``) and that has no forward
    hooks or pre-hooks. A pass may then replace the call by the functional op ``base`` runs."""
    return (isinstance(module, base) and type(module).forward is base.forward
            and not module._forward_hooks and not module._forward_pre_hooks)
