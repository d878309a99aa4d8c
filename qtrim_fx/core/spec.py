"""Frozen per-node decisions shared by the passes, and the meta keys they live under.

Annotate passes write these into ``node.meta``; materialize and lower passes
read them. Nothing else is stored in ``node.meta`` by qtrim_fx.

Contract of a prepared GraphModule (what ``qtrim_fx.prepare`` returns):

* ``gm.qtrim_blend`` is the model's :class:`~qtrim_fx.runtime.blend.BlendControl` (global λ).
* ``gm.qtrim_sites`` is an ``nn.ModuleDict`` of :class:`~qtrim_fx.runtime.site.QuantSite`,
  keyed by :attr:`SiteSpec.key`; each is called from exactly one ``call_module``
  node (``target == "qtrim_sites.<key>"``) whose single argument is the tensor
  it quantizes and whose ``meta[SITE_NODE]`` is the site's :class:`SiteSpec`.
* Weighted modules (Conv*, Linear, ...) are rewritten to their functional form so
  the weight flows ``get_attr <module>.weight -> qtrim_sites.<key> -> F.conv2d``;
  parameter names are unchanged, so the original ``state_dict`` still loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from qtrim_fx.core.scheme import QuantScheme

__all__ = [
    "ACT_SITE",
    "FLOAT_REGION",
    "GATE",
    "LOWER_PLAN",
    "OP_KIND",
    "OUTPUT_CHANNEL_AXIS",
    "OWNER",
    "SITE_NODE",
    "WEIGHT_SITE",
    "LoweredSite",
    "OpKind",
    "SiteSpec",
    "site_key",
]

#: node.meta key: the node's normalized op kind (:data:`OpKind`), written by the op normalizer.
OP_KIND = "qtrim_op_kind"
#: node.meta key on a tensor-producing node: the activation site decided for its output.
ACT_SITE = "qtrim_act_site"
#: node.meta key on a ``get_attr`` weight node (or weighted call): the weight site decided for it.
WEIGHT_SITE = "qtrim_weight_site"
#: node.meta key on an inserted ``call_module`` site node.
SITE_NODE = "qtrim_site"
#: node.meta key: qualified name of the module a functional call was rewritten from.
OWNER = "qtrim_owner"
#: node.meta key on the gate of a decomposed activation (``sigmoid`` of a SiLU): the name its site is named
#: after (``<module>.gate``).
GATE = "qtrim_gate"
#: node.meta key on a site node of a model being lowered: its :class:`LoweredSite` for the target.
LOWER_PLAN = "qtrim_lower_plan"
#: node.meta key: True on nodes of an attention-score region (QKᵀ ... softmax ... P), kept in float.
FLOAT_REGION = "qtrim_float_region"

#: Output-channel axis of a weight, by weighted op kind (conv/linear ``(O, I, ...)``, conv_transpose ``(I, O/g, ...)``).
OUTPUT_CHANNEL_AXIS: dict[str, int] = {"conv": 0, "conv_transpose": 1, "linear": 0}

OpKind = Literal[
    "conv",
    "conv_transpose",
    "linear",
    "matmul",
    "bmm",
    "addmm",
    "einsum",
    "sdpa",
    "mha",
    "softmax",
    "add",
    "mul",
    "cat",
    "activation",
    "batchnorm",
    "layernorm",
    "pool",
    "maxpool",
    "reshape",
    "relu",
    "sub",
    "div",
    "pow",
    "erf",
    "baddbmm",
    "dropout",
    "mask",
    "embedding",
    "nontensor",
    "module",
    "placeholder",
    "get_attr",
    "output",
    "other",
]


def site_key(name: str) -> str:
    """A ModuleDict-safe key for a dotted site name (``layer1.0.conv1.weight`` -> ``layer1_0_conv1_weight``).

    A name that is already an attribute of ``nn.ModuleDict`` (a site on the output of an ownerless
    ``x.to(...)`` node is named ``to``) gets a ``site_`` prefix: ``add_module`` refuses such keys.
    """
    from torch.nn import ModuleDict  # here, not at the top: core.spec is imported by torch-free tools

    key = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return f"site_{key}" if hasattr(ModuleDict(), key) else key


@dataclass(frozen=True)
class SiteSpec:
    """One quantization site.

    Attributes:
        name: unique, human-readable, points back to the PyTorch module
            (``layer1.0.conv1.weight``, ``layer1.0.relu.out``).
        kind: ``"weight"`` or ``"activation"``.
        scheme: the training-time grid.
        op: for weight sites, the weighted op (``conv``, ``conv_transpose``, ``linear``, ``matmul``...);
            for activation sites, the op that produced the tensor.
        consumers: op kinds that read the quantized tensor.
        module: owning module path (``layer1.0.conv1``), if any.
        channel_axis: output-channel axis of a weight (0 for conv/linear, 1 for conv_transpose).
        param: qualified name of the quantized parameter (``layer1.0.conv1.weight``) for weight sites.
        folded_bn: qualified name of the BatchNorm folded into this conv weight, if any.
        role: activation sites: ``"input"`` when the tensor feeds a weighted op, add, cat or
            attention matmul (every target quantizes it); ``"output"`` when it is only the output
            of a weighted op (targets that want Q on Conv/Gemm outputs keep it, others drop it).
        users: names of the graph nodes rewired to read the site (weight sites: the ops that read
            the parameter on the way to a weighted op; other readers keep the float parameter).
        notes: free-form remarks shown by ``inspect`` (e.g. "BN folded at export").
        model_output: activation sites whose value reaches no other site and no weighted op, only
            the model's outputs (logits): no integer kernel reads it, so a model prepared for no
            target or a float-capable one trains it in float and lowering leaves it float (an
            integer-only target quantizes it; its range is never clipped).
    """

    name: str
    kind: Literal["weight", "activation"]
    scheme: QuantScheme
    op: str = "other"
    consumers: tuple[str, ...] = ()
    module: str | None = None
    channel_axis: int | None = None
    param: str | None = None
    folded_bn: str | None = None
    role: Literal["input", "output"] = "input"
    users: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    model_output: bool = False

    @property
    def key(self) -> str:
        return site_key(self.name)


@dataclass(frozen=True)
class LoweredSite:
    """What lowering decided for one site and one target (written by ``PlanLoweringPass``).

    Attributes:
        name: the site's name (:attr:`SiteSpec.name`).
        kept: ``False`` when the target takes no quantizer here (the site is removed, the tensor
            stays float); ``reason`` says why.
        scheme: the target's integer grid for this tensor (``None`` when not kept).
        axis: the channel axis of the per-channel qparams in the tensor's layout, else ``None``.
        scale, zero_point: the frozen qparams derived from the site's stored statistics
            (``None`` when not kept); zero points hold integers.
        reason: why the site was dropped, or how its qparams were derived when that differs from
            the trained grid (e.g. statistics recomputed along the target's channel axis).
    """

    name: str
    kept: bool
    scheme: QuantScheme | None = None
    axis: int | None = None
    scale: Any = None
    zero_point: Any = None
    reason: str = ""
