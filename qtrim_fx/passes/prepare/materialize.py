"""InsertSitesPass: one observer + blend-quant module per annotated site.

Reads the :class:`~qtrim_fx.core.spec.SiteSpec` records written by
``AnnotateSitesPass`` and edits the graph::

    before:  w = get_attr[conv1.weight]                 y = call_module[relu](x)
             c = conv2d(x, w, ...)                      z = conv2d(y, ...); a = add(y, ...)
             b = call_module[bn1](c)

    after:   w  = get_attr[conv1.weight]                y  = call_module[relu](x)
             f  = bn_fold_factor(bn1.weight, bn1.running_var, eps)
             wq = call_module[qtrim_sites.conv1_weight](w, f)
             c  = conv2d(x, wq, ...)                     yq = call_module[qtrim_sites.relu_out](y)
             b  = call_module[bn1](c)                    z = conv2d(yq, ...); a = add(yq, ...)

Sites live in ``gm.qtrim_sites`` (an ``nn.ModuleDict``) and share the model's
single :class:`~qtrim_fx.runtime.blend.BlendControl` ``gm.qtrim_blend``. A weight site
rewires only the readers on the path to its weighted op; an activation site
replaces every use of its tensor (one quantizer per tensor) except a softmax whose scores stay float
(``meta[FLOAT_REGION]``: it reads the float tensor, unless the site is a model output); a ``model_output`` site (logits) is
built observe-only (``float_output``) unless the config's target runs only integers. Already
materialized sites are skipped, so the pass is idempotent.
"""

from __future__ import annotations

import operator
import zlib

import torch.fx as fx
from torch import nn

from qtrim_fx.core.config import QuantConfig
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.core.spec import ACT_SITE, FLOAT_REGION, OP_KIND, SITE_NODE, WEIGHT_SITE, SiteSpec
from qtrim_fx.passes.base import GraphPass, PassResult, finish
from qtrim_fx.runtime.blend import BlendControl
from qtrim_fx.runtime.observer import EmaQuantileObserver
from qtrim_fx.runtime.ops import bn_fold_factor
from qtrim_fx.runtime.prepared import SITES_ATTR, blend_control, site_modules
from qtrim_fx.runtime.site import QuantSite

__all__ = ["InsertSitesPass"]

def _make_site(spec: SiteSpec, config: QuantConfig, control: BlendControl, graph_output: bool = False,
               softmax_dim: int | None = None, mask_operand: int | None = None) -> QuantSite:
    seed = (config.seed * 7919 + zlib.crc32(spec.name.encode())) % (2**31)
    mode = "abs" if spec.kind == "weight" else "range"
    # An activation's range rule works for its own grid; a model output is never clipped.
    # A model output is never clipped, nor is an attention mask (its masking value must survive).
    obs = EmaQuantileObserver(mode=mode, axis=spec.scheme.axis, seed=seed, grid=spec.scheme,
                              clip=not graph_output and mask_operand is None,
                              softmax_dim=softmax_dim, mask_operand=mask_operand,
                              **config.observer_kwargs())
    site = QuantSite(spec.scheme, obs, control, kind=spec.kind, eps=config.eps)
    site._qtrim_name = spec.name
    # Logits feed no integer kernel: float in training and in the file, unless the target runs only integers.
    site.float_output = spec.model_output and not (config.target and get_profile(config.target).integer_only)
    return site


class InsertSitesPass(GraphPass):
    """Insert a ``call_module`` site node for every annotated site (see module doc)."""

    def __init__(self, config: QuantConfig | None = None) -> None:
        self.config = config or QuantConfig()

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            for key in (WEIGHT_SITE, ACT_SITE):
                spec = node.meta.get(key)
                if spec is None or _already_materialized(node, spec):
                    continue
                # Created with the first site only: a graph with nothing to insert is left as it was.
                control, sites = blend_control(gm), site_modules(gm)
                if spec.key not in sites:
                    out = key == ACT_SITE and any(u.op == "output" for u in node.users)
                    act = key == ACT_SITE
                    sites[spec.key] = _make_site(spec, self.config, control, graph_output=out,
                                                 # a model output (logits) is never clipped nor re-observed
                                                 softmax_dim=_softmax_dim(gm, node) if act and not out else None,
                                                 mask_operand=_mask_operand(gm, node) if act else None)
                if key == WEIGHT_SITE:
                    self._insert_weight(gm, node, spec)
                else:
                    self._insert_activation(gm, node, spec)
                modified = True
        return finish(gm, modified)

    def _insert_activation(self, gm: fx.GraphModule, node: fx.Node, spec: SiteSpec) -> None:
        with gm.graph.inserting_after(node):
            site = gm.graph.call_module(f"{SITES_ATTR}.{spec.key}", (node,))
        site.meta[SITE_NODE] = spec
        _copy_val(node, site)
        # A softmax in a float attention region (FLOAT_REGION, written by AnnotateSitesPass) keeps reading the
        # float tensor: its scores stay float on this target, in training as in the file (no DQ feeds a Softmax).
        # A model-output site (logits) is float in training anyway; it keeps its reader, so a file for an
        # integer-only target, which quantizes the logits, still feeds the softmax from them.
        float_reader = (lambda u: False) if spec.model_output else _float_softmax
        node.replace_all_uses_with(site, delete_user_cb=lambda u: u is not site and not float_reader(u))
        # The blend's backward reads its saved output unless a reader may overwrite it.
        gm.get_submodule(str(site.target)).keep_output = not any(_may_write_in_place(gm, u) for u in site.users)

    def _insert_weight(self, gm: fx.GraphModule, node: fx.Node, spec: SiteSpec) -> None:
        graph = gm.graph
        users = [u for u in node.users if u.name in spec.users]
        first = (users[0] if len(users) == 1 else min(users, key=_position)) if users else None
        if first is None:
            return
        with graph.inserting_before(first):
            args: tuple = (node,)
            if spec.folded_bn is not None:
                bn = gm.get_submodule(spec.folded_bn)
                gamma = graph.get_attr(f"{spec.folded_bn}.weight") if bn.weight is not None else None
                var = graph.get_attr(f"{spec.folded_bn}.running_var")
                args = (node, graph.call_function(bn_fold_factor, (gamma, var, float(bn.eps))))
            site = graph.call_module(f"{SITES_ATTR}.{spec.key}", args)
        site.meta[SITE_NODE] = spec
        _copy_val(node, site)
        for u in users:
            u.replace_input_with(node, site)


def _softmax_dim(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The dim of a softmax that reads ``node`` (an attention mask's sentinels then do not set its grid), else None."""
    for u in node.users:
        if u.meta.get(OP_KIND) != "softmax" or not u.args or u.args[0] is not node:
            continue
        if u.op == "call_module":
            dim = getattr(gm.get_submodule(str(u.target)), "dim", None)
        else:
            dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
        if isinstance(dim, int) and not isinstance(dim, bool):
            return dim
    return None


def _mask_operand(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The softmax dim when ``node`` is the mask of ``softmax(scores + mask)`` (an operand of that add, or of what it
    adds, not computed from a matmul: the scores are), else None."""
    if _from_matmul(node):
        return None
    # through views, casts and further adds (T5: ``scores + (position_bias + mask)``), a few ops deep
    frontier, seen = list(node.users), set()
    for _ in range(4):
        nxt = []
        for u in frontier:
            if u in seen or u.meta.get(OP_KIND) not in ("add", "reshape"):
                continue
            seen.add(u)
            if u.meta.get(OP_KIND) == "add" and (dim := _softmax_dim(gm, u)) is not None:
                return dim
            nxt += list(u.users)
        frontier = nxt
    return None


def _from_matmul(node: fx.Node, depth: int = 6) -> bool:
    """``node`` is a matmul, or computed from one within ``depth`` ops (the scores, scaled / masked / viewed)."""
    seen, frontier = set(), [node]
    for _ in range(depth + 1):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if n.meta.get(OP_KIND) in ("matmul", "bmm", "linear"):
                return True
            nxt += [a for a in n.all_input_nodes if a.op != "get_attr"]
        frontier = nxt
    return False


def _float_softmax(node: fx.Node) -> bool:
    return bool(node.meta.get(FLOAT_REGION)) and node.meta.get(OP_KIND) == "softmax"


#: readers that may return their input itself or a view of it (an in-place op further on writes through it)
_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                  nn.AlphaDropout, nn.FeatureAlphaDropout)
_ALIAS_NAMES = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
    "permute", "movedim", "expand", "expand_as", "contiguous", "getitem", "narrow", "select", "t", "detach",
    "chunk", "split", "unbind", "tensor_split", "as_strided", "dropout", "identity", "to", "type_as", "float",
})


def _may_write_in_place(gm: fx.GraphModule, user: fx.Node, depth: int = 0) -> bool:
    """Whether ``user``, or a reader of an alias it returns, may modify the tensor in place.

    In place: ``inplace=True``, ``x.add_()``, ``+=``. Aliases: views, identities, dropout, and any leaf
    module outside torch.nn (timm's ``norm_head = Identity`` before an in-place Hardswish writes into the
    site's output itself).
    """
    if user.kwargs.get("inplace", False):
        return True
    if user.op == "call_module":
        mod = gm.get_submodule(str(user.target))
        if getattr(mod, "inplace", False):
            return True
        aliases = isinstance(mod, _ALIAS_MODULES) or not type(mod).__module__.startswith("torch.nn")
    else:
        name = getattr(user.target, "__name__", str(user.target))
        if user.op == "call_function" and name.startswith("i") and getattr(operator, name, None) is user.target:
            return True  # operator.iadd and friends
        if name.endswith("_") and not name.endswith("__"):
            return True
        aliases = name in _ALIAS_NAMES
    return aliases and depth < 16 and any(_may_write_in_place(gm, u, depth + 1) for u in user.users)


def _position(node: fx.Node) -> int:
    n, i = node, 0
    while n.op != "root":
        n = n.prev
        i += 1
    return i


def _already_materialized(node: fx.Node, spec: SiteSpec) -> bool:
    target = f"{SITES_ATTR}.{spec.key}"
    return any(u.op == "call_module" and u.target == target for u in node.users)


def _copy_val(src: fx.Node, dst: fx.Node) -> None:
    for k in ("val", "tensor_meta", "nn_module_stack"):
        if k in src.meta:
            dst.meta[k] = src.meta[k]
