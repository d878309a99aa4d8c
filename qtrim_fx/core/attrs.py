"""Attribute resolution on modules and FX graphs: the one ``a.b.c`` walk every stage uses."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

__all__ = ["get_attr_tensor", "resolve_attr"]


def resolve_attr(root: Any, target: str, default: Any = None) -> Any:
    """``root.a.b.c`` for ``target = "a.b.c"``; ``default`` as soon as a step is missing (or ``root`` is None)."""
    obj = root
    for name in target.split("."):
        if obj is None:
            return default
        obj = getattr(obj, name, default)
        if obj is default:
            return default
    return obj


def get_attr_tensor(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (a parameter or buffer of ``gm``), else ``None``."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    obj = resolve_attr(gm, str(node.target))
    return obj if isinstance(obj, torch.Tensor) else None
