"""AnnotateSitesPass: decide every quantization site (analysis only, no graph edits).

Reads ``node.meta[OP_KIND]`` (``NormalizeOpsPass``) and writes frozen
:class:`~qtrim_fx.core.spec.SiteSpec` records::

    get_attr[layer1.0.conv1.weight]  meta[WEIGHT_SITE] = SiteSpec("layer1.0.conv1.weight", "weight", int8 per-channel(0),
                                                                  folded_bn="layer1.0.bn1")
    call_module[layer1.0.relu]       meta[ACT_SITE]    = SiteSpec("layer1.0.relu.out", "activation", uint8 asym)
    matmul (QKᵀ), softmax, P         meta[FLOAT_REGION] = True          (attention scores stay float)

Rules (DESIGN.md):
* weight sites: the parameter operand of every conv / conv_transpose / linear, and of
  matmul / bmm / addmm / baddbmm / einsum when one operand is a parameter; found through views, chunks
  and transposes of the parameter (``in_proj_weight.chunk(3)``, ``W.t()``);
* activation sites (one per tensor, shared by all consumers): the data input of
  weighted ops, both inputs of residual adds, the inputs of concats, outputs of
  nonlinearities, the sources of Q, K, V of attention matmuls / SDPA (traced back
  through reshapes to the projection), and — with role ``"output"`` — outputs of
  weighted ops (after a foldable BatchNorm) that no other site covers; a site whose value reaches
  no other site and no weighted op (logits) is marked ``model_output`` (float on float targets);
* never: attention scores (QKᵀ, its scaling, the mask add, softmax in/out, the
  probabilities entering P·V), non-tensors (shapes, Python scalars), constants. A softmax in such a region
  reads the float tensor even where that tensor has a site (``InsertSitesPass``; a model-output site, float
  in training, keeps it as a reader); a site read by nothing else still observes.

The graph walks behind these rules are in :mod:`qtrim_fx.passes.prepare.graph_walks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx

from qtrim_fx.core.config import QuantConfig
from qtrim_fx.core.modules import is_parametrized_attr, is_plain_batchnorm
from qtrim_fx.core.profiles import get_profile
from qtrim_fx.core.spec import (
    ACT_SITE,
    FLOAT_REGION,
    GATE,
    OP_KIND,
    OUTPUT_CHANNEL_AXIS,
    OWNER,
    WEIGHT_SITE,
    SiteSpec,
)
from qtrim_fx.passes.base import GraphPass, PassResult
from qtrim_fx.passes.prepare.graph_walks import (
    attention_float_region,
    covered,
    data_source,
    dynamic_nodes,
    map_axis,
    model_output_sites,
    node_owner,
    param_source,
    through_views,
)
from qtrim_fx.passes.prepare.integer_sites import add_integer_sites, site_rules
from qtrim_fx.passes.prepare.normalize import arg, is_tensor_node
from qtrim_fx.passes.prepare.ranks import rank

__all__ = ["AnnotateSitesPass"]

_WEIGHTED = frozenset({"conv", "conv_transpose", "linear"})
_MATMULS = frozenset({"matmul", "bmm", "baddbmm", "einsum"})
_NONLINEAR = frozenset({"relu", "activation"})
# Output channel axis of each weighted op's weight, in the weight's own layout.
_OUT_AXIS = OUTPUT_CHANNEL_AXIS


@dataclass
class _Candidate:
    role: str = "output"
    consumers: list[str] = field(default_factory=list)
    owners: list[str | None] = field(default_factory=list)


class _Analysis:
    def __init__(self, gm: fx.GraphModule, config: QuantConfig) -> None:
        self.gm = gm
        self.config = config
        self.modules = dict(gm.named_modules())
        self.params = dict(gm.named_parameters(remove_duplicate=False))
        self.kind = {n: n.meta.get(OP_KIND, "other") for n in gm.graph.nodes}
        self._tensor: dict[fx.Node, bool] = {}
        self.dynamic = dynamic_nodes(gm.graph)
        self.region: set[fx.Node] = set()
        self.candidates: dict[fx.Node, _Candidate] = {}
        self.weights: dict[fx.Node, tuple[fx.Node, str, int | None, set[fx.Node]]] = {}
        self.folds: dict[fx.Node, str] = {}
        #: weight operands computed from parameters only (weight standardization, a parametrization): their
        #: sites quantize the computed tensor; no parameter to prune, no BatchNorm folded into them
        self.derived: set[fx.Node] = set()
        #: weight get_attr -> the axis its per-channel grid is trained on, where the target's differs from the
        #: output channel (``tensorrt``: ConvTranspose on axis 0, as lowering writes it)
        self.grid_axes: dict[fx.Node, int | None] = {}
        # config.target: that profile's extra activation sites (and integer attention scores, if it says so)
        self.profile = get_profile(config.target) if config.target is not None else None
        self.integer_scores = self.profile is not None and self.profile.integer_attention_scores

    # -- helpers -------------------------------------------------------------------------
    def is_tensor(self, n: object) -> bool:
        if not isinstance(n, fx.Node):
            return False
        if n not in self._tensor:
            self._tensor[n] = is_tensor_node(n, self.kind, self.modules)
        return self._tensor[n]

    owner = staticmethod(node_owner)

    def param_source(self, n: object) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
        """Walk back through views to a parameter: (get_attr node, first user on the path, path)."""
        return param_source(n, self.params, self.kind, self.dynamic)

    def data_source(self, n: object) -> fx.Node | None:
        """Walk back from an attention operand through views and scalar scaling to its producer."""
        return data_source(n, self.kind, self.is_tensor)

    def add_candidate(self, n: object, role: str, consumer: str, owner: str | None, static: bool = False) -> None:
        """A site on tensor ``n``; ``static``: ``n`` may be a parameter/buffer operand (integer-only targets)."""
        if not isinstance(n, fx.Node) or n in self.region or (self.kind[n] == "softmax" and not self.integer_scores):
            return
        if not self.is_tensor(n) or (not static and (n not in self.dynamic or n.op == "get_attr")):
            return
        if n.op == "placeholder" and not self.config.quantize_inputs:
            return
        c = self.candidates.setdefault(n, _Candidate())
        if role == "input":
            c.role = "input"
        c.consumers.append(consumer)
        c.owners.append(owner)

    # -- steps ---------------------------------------------------------------------------
    def find_weights(self) -> None:
        for n in self.gm.graph.nodes:
            k = self.kind[n]
            if k in _WEIGHTED:
                self._weight(n, arg(n, 1, "weight"), k, _OUT_AXIS[k], data=arg(n, 0, "input"))
            elif k in ("matmul", "bmm"):
                a, b = arg(n, 0, "input"), arg(n, 1, "other")
                if self.param_source(b):
                    self._weight(n, b, k, -1, data=a)
                elif self.param_source(a):
                    self._weight(n, a, k, -2, data=b)
            elif k in ("addmm", "baddbmm"):  # bias + m1 @ m2: the parameter is m2 (x @ W) or m1 (W @ x)
                names = ("mat1", "mat2") if k == "addmm" else ("batch1", "batch2")
                m1, m2 = arg(n, 1, names[0]), arg(n, 2, names[1])
                as_kind = "matmul" if k == "addmm" else "bmm"  # lowered and exported like the matmul it computes
                if self.param_source(m2):
                    self._weight(n, m2, as_kind, -1, data=m1)
                elif self.param_source(m1):
                    self._weight(n, m1, as_kind, -2, data=m2)
            elif k == "einsum":
                ops = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
                params = [o for o in ops if self.param_source(o)]
                if len(params) == 1:
                    data = next((o for o in ops if o is not params[0]), None)
                    self._weight(n, params[0], k, None, data=data)

    def _weight(self, op: fx.Node, w: object, kind: str, axis: int | None, data: object) -> None:
        src = self.param_source(w)
        if src is None:
            if kind in _WEIGHTED and isinstance(w, fx.Node) and self.computed_from_parameters(w):
                self._derived_weight(op, w, kind, axis, data)
            return
        g, first, path = src
        param = self.params[str(g.target)]
        want = self.profile.weight_axes.for_op(kind) if self.profile is not None and kind in _WEIGHTED else None
        if want is not None and want != axis:
            self.grid_axes[g] = map_axis(want, path, param.dim())
        axis = map_axis(axis, path, param.dim())
        reader = first if first is not None else op
        entry = self.weights.get(g)
        users = (entry[3] if entry else set()) | {reader}
        self.weights[g] = (op, kind, axis, users)
        self.add_candidate(data, "input", kind, self.owner(op))

    def computed_from_parameters(self, w: fx.Node) -> bool:
        """``w`` is a float tensor computed from parameters only (no graph input), at least one of them a
        weight (rank >= 2): ``F.batch_norm(self.weight ...)`` (timm StdConv2d), a parametrization's ``weight``."""
        if w in self.dynamic or not self.is_tensor(w):
            return False
        if w.op == "get_attr":
            return is_parametrized_attr(self.gm, str(w.target))
        if w.op not in ("call_function", "call_method"):
            return False
        seen, stack = {w}, [w]
        while stack:
            for a in stack.pop().all_input_nodes:
                if a in seen:
                    continue
                seen.add(a)
                if a.op == "get_attr" and ((str(a.target) in self.params and self.params[str(a.target)].dim() >= 2)
                                           or is_parametrized_attr(self.gm, str(a.target))):
                    return True
                stack.append(a)
        return False

    def _derived_weight(self, op: fx.Node, w: fx.Node, kind: str, axis: int | None, data: object) -> None:
        want = self.profile.weight_axes.for_op(kind) if self.profile is not None else None
        if want is not None and want != axis:
            self.grid_axes[w] = want
        entry = self.weights.get(w)
        users = (entry[3] if entry else set()) | {op}
        self.weights[w] = (op, kind, axis, users)
        self.derived.add(w)
        self.add_candidate(data, "input", kind, self.owner(op))

    def per_tensor(self, op: fx.Node, kind: str) -> bool:
        """The profile stores this weight per-tensor (all weights on ``npu``; MatMul-form ones on ``qnn``): trained so."""
        if self.profile is not None and not self.profile.weight_per_channel:
            return True
        return self.matmul_form(op, kind)

    def matmul_form(self, op: fx.Node, kind: str) -> bool:
        """The target's profile wants per-tensor weights for ops written as ONNX MatMul, and ``op`` is one.

        ``x @ W`` always is; ``F.linear`` is when its input has 3+ dims (2-D: ``Gemm``); an unknown rank
        (no example inputs at ``prepare``) counts as not (the weight keeps the config's granularity).
        """
        if self.profile is None or not self.profile.matmul_weights_per_tensor:
            return False
        if kind == "linear":
            r = rank(arg(op, 0, "input"))
            return r is not None and r >= 3
        return self.kind[op] == "matmul"

    def is_weighted_output(self, n: object) -> bool:
        """``n`` is the output of a conv/linear/matmul-with-weight (or of the BatchNorm folded into one)."""
        if not isinstance(n, fx.Node):
            return False
        if n in self.weight_ops():
            return True
        return bool(n.args) and n.args[0] in self.folds and next(iter(n.args[0].users)) is n

    def find_float_regions(self) -> None:
        """Softmax, the score ops before it back to QKᵀ, and the probabilities after it up to P·V.

        None when the target's profile quantizes attention scores (``integer_attention_scores``).
        """
        if not self.integer_scores:
            self.region = attention_float_region(self.gm.graph, self.kind, self.weight_ops())

    def weight_ops(self) -> set[fx.Node]:
        if not hasattr(self, "_wops"):
            self._wops = {v[0] for v in self.weights.values()}
        return self._wops

    def find_activations(self) -> None:
        for n in self.gm.graph.nodes:
            k = self.kind[n]
            if k in ("matmul", "bmm", "baddbmm") and n not in self.weight_ops():
                operands = n.args[1:3] if k == "baddbmm" else n.args[:2]
                for o in operands:
                    self.add_candidate(self.data_source(o), "input", k, self.owner(n))
            elif k == "sdpa":
                for o in n.args[:3]:
                    self.add_candidate(self.data_source(o), "input", k, self.owner(n))
            elif k == "mha":
                for o in n.args[:3]:
                    self.add_candidate(o, "input", k, self.owner(n))
            elif k == "add" and n not in self.region:
                ts = [a for a in n.args[:2] if self.is_tensor(a) and a in self.dynamic]
                if len(ts) == 2:
                    for a in ts:
                        # A conv/linear output entering a residual add is an op *output* (TensorRT fuses
                        # Conv+Add and wants only the skip input quantized); ONNX Runtime keeps it.
                        role = "output" if self.is_weighted_output(a) else "input"
                        self.add_candidate(a, role, k, self.owner(n))
            elif k == "cat" and n not in self.region:
                for a in (n.args[0] if n.args and isinstance(n.args[0], (list, tuple)) else ()):
                    # A conv/linear output reaching the concat through views (a ViT's patch embedding) is
                    # an op *output*: back ends that want inputs-only Q/DQ drop it (OpenVINO mis-computes a
                    # quantized Conv -> Reshape -> Transpose -> Concat chain; TensorRT wants no output Q).
                    role = "output" if self.is_weighted_output(through_views(a, self.kind)) else "input"
                    self.add_candidate(a, role, k, self.owner(n))
            elif k in _NONLINEAR and n not in self.region:
                self.add_candidate(n, "input", k, self.owner(n))

    def find_folds(self) -> None:
        for g, (op, kind, _axis, _users) in self.weights.items():
            if kind != "conv" or len(op.users) != 1 or g in self.derived:
                continue
            (bn,) = op.users
            m = self.modules.get(str(bn.target)) if bn.op == "call_module" else None
            if is_plain_batchnorm(m) and bn.args[0] is op:  # exactly BatchNorm: anything more stays in the graph
                self.folds[op] = str(bn.target)

    def share_grid_preserving(self) -> None:
        """Drop candidates that a max-pool / view of an already quantized tensor produces.

        ``maxpool(Q(x))`` and ``view(Q(x))`` are already on ``x``'s grid; a second quantizer
        there would only add rounding (ONNX Runtime propagates the Q/DQ pair itself).
        """
        for n in list(self.candidates):  # hoist Q(view(x)) to view(Q(x)): ONNX Runtime wants Q on the op output
            root = n
            while (self.kind[root] == "reshape" and root.args and isinstance(root.args[0], fx.Node)
                   and len(root.args[0].users) == 1 and self.is_tensor(root.args[0])
                   and root.args[0] in self.dynamic and root.args[0] not in self.region
                   and self.kind[root.args[0]] not in ("softmax", "module", "mha")):
                root = root.args[0]
            if root is not n and root not in self.candidates:
                self.candidates[root] = self.candidates.pop(n)
        for n in list(self.candidates):
            src = n
            while self.kind[src] in ("maxpool", "reshape", "dropout") and src.args and isinstance(
                src.args[0], fx.Node
            ):
                src = src.args[0]
                if src in self.candidates:
                    c, s = self.candidates.pop(n), self.candidates[src]
                    if c.role == "input":
                        s.role = "input"
                    s.consumers += c.consumers
                    s.owners += c.owners
                    break

    def find_outputs(self) -> None:
        for op in self.weight_ops():
            if op in self.region:
                continue
            out = next(iter(op.users)) if op in self.folds else op
            if not covered(out, self.candidates, self.kind):
                self.add_candidate(out, "output", self.kind[op], self.owner(op))


class AnnotateSitesPass(GraphPass):
    """Decide weight and activation sites; store frozen :class:`SiteSpec` records in ``node.meta``.

    Args:
        config: the :class:`~qtrim_fx.QuantConfig` (bits, granularity, overrides, exclusions).
    """

    def __init__(self, config: QuantConfig | None = None) -> None:
        self.config = config or QuantConfig()

    def call(self, gm: fx.GraphModule) -> PassResult:
        a = _Analysis(gm, self.config)
        a.find_weights()
        a.find_folds()
        a.find_float_regions()
        a.find_activations()
        add_integer_sites(a, site_rules(a.profile))
        a.share_grid_preserving()
        a.find_outputs()
        specs = self._weight_specs(a) | self._act_specs(a)
        modified = False
        for n in gm.graph.nodes:
            # FLOAT_REGION is a decision too: written where the analysis found one, removed where stale.
            if bool(n.meta.get(FLOAT_REGION)) != (n in a.region):
                modified = True
                if n in a.region:
                    n.meta[FLOAT_REGION] = True
                else:
                    n.meta.pop(FLOAT_REGION, None)
            key = WEIGHT_SITE if n in a.weights else ACT_SITE
            new = specs.get(n)
            for k in (WEIGHT_SITE, ACT_SITE):
                old = n.meta.get(k)
                want = new if k == key else None
                if old != want:
                    modified = True
                    if want is None:
                        n.meta.pop(k, None)
                    else:
                        n.meta[k] = want
        return PassResult(gm, modified)

    def _weight_specs(self, a: _Analysis) -> dict[fx.Node, SiteSpec]:
        out = {}
        taken = {str(g.target) for g in a.weights if g not in a.derived}
        for g, (op, kind, axis, users) in a.weights.items():
            derived = g in a.derived
            owner = a.owner(op) or (None if derived else str(g.target).rpartition(".")[0] or None)
            name = str(g.target) if not derived else _unique(f"{owner or op.name}.weight", taken)
            mtype = type(a.modules.get(owner or "", None))
            s = self.config.settings_for(owner, mtype, kind)
            if s.exclude:
                continue
            folded = a.folds.get(op)
            per_tensor = a.per_tensor(op, kind) and not _granularity_overridden(self.config, owner, mtype, kind)
            out[g] = SiteSpec(
                name=name,
                kind="weight",
                scheme=s.weight_scheme(None if per_tensor else a.grid_axes.get(g, axis)),
                op=kind,
                consumers=(kind,),
                module=owner,
                channel_axis=axis,
                param=None if derived else str(g.target),
                folded_bn=folded,
                users=tuple(sorted(u.name for u in users)),
                notes=(f"BatchNorm {folded} folded into this weight",) if folded else
                ("weight computed from parameters (quantized as computed; not pruned)",) if derived else (),
            )
        return out

    def _act_specs(self, a: _Analysis) -> dict[fx.Node, SiteSpec]:
        out = {}
        names: set[str] = set()
        for n, c in a.candidates.items():
            owner = a.owner(n)
            s = self.config.settings_for(owner, type(a.modules.get(owner or "", None)), a.kind[n])
            consumer_excluded = [
                self.config.settings_for(o, type(a.modules.get(o or "", None)), k).exclude
                for o, k in zip(c.owners, c.consumers, strict=True)
            ]
            if s.exclude or (consumer_excluded and all(consumer_excluded)):
                continue
            if c.role == "output" and a.profile is not None and not a.profile.quantize_op_outputs:
                continue  # the target takes no Q on Conv/Gemm/MatMul outputs: lowering would drop what was trained
            name = _unique(_act_name(n, owner), names)
            out[n] = SiteSpec(
                name=name,
                kind="activation",
                scheme=s.act_scheme(),
                op=a.kind[n],
                consumers=tuple(dict.fromkeys(c.consumers)),
                module=owner,
                role=c.role,  # type: ignore[arg-type]
            )
        for n in model_output_sites(out, {v[0] for v in a.weights.values()}):
            out[n] = replace(out[n], model_output=True)
        return out


def _granularity_overridden(config: QuantConfig, owner: str | None, mtype: type, kind: str) -> bool:
    """An ``Override`` matching this weight sets ``weight_per_channel``: the user's choice beats the profile's."""
    return any(o.weight_per_channel is not None and o.matches(owner, mtype, kind) for o in config.overrides)


def _act_name(n: fx.Node, owner: str | None) -> str:
    if n.op == "placeholder":
        return f"input.{n.name}"
    if n.op == "call_module":
        return f"{n.target}.out"
    if n.meta.get(GATE):
        return f"{n.meta[GATE]}.gate"
    if n.meta.get(OWNER):
        return f"{n.meta[OWNER]}.out"
    return f"{owner}.{n.name}" if owner else n.name


def _unique(name: str, taken: set[str]) -> str:
    base, i = name, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def weight_param(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The parameter a weight-site ``get_attr`` node reads."""
    return gm.get_parameter(str(node.target))
