"""Module predicates shared by the stages: which modules are exactly what a pass assumes."""

from __future__ import annotations

from torch import nn

__all__ = ["is_plain_batchnorm"]

#: ``forward`` methods of torch's own BatchNorm classes (BatchNorm1d/2d/3d and the lazy ones inherit
#: ``_BatchNorm.forward``; SyncBatchNorm has its own).
_PLAIN_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def is_plain_batchnorm(module: object) -> bool:
    """Whether ``module`` computes exactly BatchNorm with running statistics, nothing more.

    A subclass that overrides ``forward`` (timm's ``BatchNormAct2d`` adds an activation and dropout)
    is not: folding it into a conv would drop what its forward adds. Such modules stay in the graph.
    """
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and type(module).forward in _PLAIN_BN_FORWARDS
        and module.running_var is not None
        and module.running_mean is not None
    )
